package main

import (
	"context"
	"errors"
	"sync"
	"time"

	authv1 "github.com/cex-core/cex-core/gen/go/cex/auth/v1"
)

var errNoToken = errors.New("IssueToken returned no token")

// tokenSource is grpc.PerRPCCredentials backed by IssueToken: it exchanges the
// API key for a short-lived JWT and renews it a minute (or a fifth of its
// lifetime, if shorter) before it expires.
type tokenSource struct {
	auth    authv1.AuthServiceClient
	keyID   string
	secret  string
	timeout time.Duration

	mu        sync.Mutex
	token     string
	renewAt   time.Time
	accountID string
}

func (t *tokenSource) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token == "" || !time.Now().Before(t.renewAt) {
		ctx, cancel := context.WithTimeout(ctx, t.timeout)
		defer cancel()
		reply, err := t.auth.IssueToken(ctx, &authv1.IssueTokenRequest{ApiKeyId: t.keyID, ApiKeySecret: t.secret})
		if err != nil {
			return nil, err
		}
		if reply.AccessToken == "" {
			return nil, errNoToken
		}
		expires := reply.ExpireTime.AsTime()
		margin := min(time.Minute, time.Until(expires)/5)
		t.token, t.renewAt, t.accountID = reply.AccessToken, expires.Add(-margin), reply.AccountId
	}
	return map[string]string{"authorization": "Bearer " + t.token}, nil
}

// RequireTransportSecurity is false only because the local edge is plaintext;
// return true when talking to a TLS endpoint.
func (t *tokenSource) RequireTransportSecurity() bool { return false }
