// Command cex-example gets an access token from an API key and calls protected
// methods through the exchange's edge (Envoy): the caller's account and its
// balances, and with -place-order a limit order that it then cancels.
//
//	export CEX_API_KEY_ID=ak_... CEX_API_KEY_SECRET=sk_...
//	go run . -target 127.0.0.1:50050
//
// Each result is printed as one JSON line; a failed call prints its gRPC code
// and ErrorInfo reason on stderr and exits 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	authv1 "github.com/cex-core/cex-core/gen/go/cex/auth/v1"
	ledgerv1 "github.com/cex-core/cex-core/gen/go/cex/ledger/v1"
	orderv1 "github.com/cex-core/cex-core/gen/go/cex/order/v1"
	typev1 "github.com/cex-core/cex-core/gen/go/cex/type/v1"
)

func main() {
	target := flag.String("target", envOr("CEX_TARGET", "127.0.0.1:50050"), "the edge (Envoy), host:port")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each call")
	placeOrder := flag.Bool("place-order", false, "also place a limit order and cancel it (needs a trade key and the order service)")
	market := flag.String("market", "BTC-USDT", "market for -place-order")
	price := flag.String("price", "1000", "limit price for -place-order (a decimal string)")
	quantity := flag.String("quantity", "0.001", "quantity for -place-order (a decimal string)")
	flag.Parse()

	keyID, secret := os.Getenv("CEX_API_KEY_ID"), os.Getenv("CEX_API_KEY_SECRET")
	if keyID == "" || secret == "" {
		fmt.Fprintln(os.Stderr, "set CEX_API_KEY_ID and CEX_API_KEY_SECRET (cex apikey create prints them)")
		os.Exit(2)
	}
	if err := run(*target, keyID, secret, *timeout, *placeOrder, *market, *price, *quantity); err != nil {
		report(err)
		os.Exit(1)
	}
}

func run(target, keyID, secret string, timeout time.Duration, placeOrder bool, market, price, quantity string) error {
	// One channel for IssueToken and for the calls it authorises. Locally the
	// edge is plaintext; in production use credentials.NewTLS.
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	)
	if err != nil {
		return err
	}
	defer conn.Close()

	tokens := &tokenSource{auth: authv1.NewAuthServiceClient(conn), keyID: keyID, secret: secret, timeout: timeout}
	auth := authv1.NewAuthServiceClient(conn)
	ledger := ledgerv1.NewLedgerServiceClient(conn)
	bearer := grpc.PerRPCCredentials(tokens)

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if _, err := tokens.GetRequestMetadata(ctx); err != nil {
		return err
	}
	account, err := auth.GetAccount(ctx, &authv1.GetAccountRequest{AccountId: tokens.accountID}, bearer)
	if err != nil {
		return err
	}
	emit(map[string]any{"account_id": account.Account.AccountId, "state": account.Account.State.String()})

	ctx, cancel = context.WithTimeout(context.Background(), timeout)
	defer cancel()
	balances, err := ledger.GetBalances(ctx, &ledgerv1.GetBalancesRequest{}, bearer)
	if err != nil {
		return err
	}
	rows := []map[string]string{}
	for _, b := range balances.Balances {
		rows = append(rows, map[string]string{"asset": b.Asset, "available": b.Available, "held": b.Held})
	}
	emit(map[string]any{"balances": rows})

	if placeOrder {
		return placeAndCancel(conn, bearer, timeout, market, price, quantity)
	}
	return nil
}

// placeAndCancel places a GTC limit buy and cancels it. Both carry their
// idempotency ids, so either may be retried after a transport failure.
func placeAndCancel(conn *grpc.ClientConn, bearer grpc.CallOption, timeout time.Duration, market, price, quantity string) error {
	orders := orderv1.NewOrderServiceClient(conn)
	clientOrderID := fmt.Sprintf("go-example-%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	placed, err := orders.PlaceOrder(ctx, &orderv1.PlaceOrderRequest{
		ClientOrderId: clientOrderID,
		Market:        market,
		Side:          typev1.Side_SIDE_BUY,
		Type:          typev1.OrderType_ORDER_TYPE_LIMIT,
		TimeInForce:   typev1.TimeInForce_TIME_IN_FORCE_GTC,
		Price:         price,
		Quantity:      quantity,
	}, bearer)
	if err != nil {
		return err
	}
	emit(map[string]any{"placed": placed.Order.OrderId, "client_order_id": clientOrderID})
	ctx, cancel = context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cancelled, err := orders.CancelOrder(ctx, &orderv1.CancelOrderRequest{
		RequestId: "cancel-" + clientOrderID,
		OrderId:   placed.Order.OrderId,
	}, bearer)
	if err != nil {
		return err
	}
	emit(map[string]any{"cancelled": cancelled.Order.OrderId, "state": cancelled.Order.State.String()})
	return nil
}

func emit(v any) {
	line, _ := json.Marshal(v)
	fmt.Println(string(line))
}

// report prints a failed call's code and the ErrorInfo the exchange attaches.
func report(err error) {
	st, ok := status.FromError(err)
	if !ok {
		fmt.Fprintln(os.Stderr, "error:", err)
		return
	}
	out := map[string]any{"code": st.Code().String(), "message": st.Message()}
	for _, d := range st.Details() {
		switch info := d.(type) {
		case *errdetails.ErrorInfo:
			out["reason"], out["domain"], out["metadata"] = info.Reason, info.Domain, info.Metadata
		case *errdetails.RetryInfo:
			out["retry_after_s"] = info.RetryDelay.AsDuration().Seconds()
		}
	}
	line, _ := json.Marshal(out)
	fmt.Fprintln(os.Stderr, string(line))
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
