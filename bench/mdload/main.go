// Command mdload is the subscriber side of `make bench-market-data`: many
// StreamOrderBook streams and NATS md.<market>.book subscribers in one Go
// process, so that the market data process (Python) is measured, not a Python
// client decoding hundreds of thousands of messages a second on the same cores.
//
// It reads commands on stdin, one a line, and answers each on stdout:
//
//	grpc N    open StreamOrderBook streams until N are open; "ok" once each got its snapshot
//	nats N    subscribe md.<market>.book until N subscriptions; "ok" once flushed
//	close     end every gRPC stream and NATS subscription
//	reset     forget the latencies and counters so far
//	report    "report <deltas> <p50 ms> <p99 ms> <max ms> <gaps> <resyncs> <cpu s> <rss MB>
//	          <events> <every-event p50 ms> <p99 ms> <max ms>"
//
// Two latencies, over every non-empty delta. "newest": receipt time minus the
// delta's update_time (the newest match event it carries). "every event": a
// merged delta carries every event after prev_seq, and each of those that
// changed the subscriber's depth waited from its own time until this receipt,
// so each counts once (the event times come from match.events.<market> on
// NATS, one EventBatch a message, recorded by seq for the events the publisher
// marked Bench-Visible);
// this is the delay a subscriber's book really had. A gap is a delta whose
// prev_seq is not the seq this subscriber last saw (the service promises none);
// resyncs count the snapshots flagged resynced.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/protobuf/proto"

	mdv1 "github.com/cex-core/cex-core/gen/go/cex/marketdata/v1"
	matchv1 "github.com/cex-core/cex-core/gen/go/cex/match/v1"
)

const bucketUs = 50                   // histogram resolution
const buckets = 20_000_000 / bucketUs // up to 20 s

type stats struct {
	hist    []atomic.Uint64
	count   atomic.Uint64
	gaps    atomic.Uint64
	resyncs atomic.Uint64
}

func (s *stats) observe(updateNs int64) {
	s.observeAt(time.Now().UnixNano(), updateNs)
}

func (s *stats) observeAt(nowNs, updateNs int64) {
	us := (nowNs - updateNs) / 1000
	b := us / bucketUs
	if b < 0 {
		b = 0
	}
	if b >= buckets {
		b = buckets - 1
	}
	s.hist[b].Add(1)
	s.count.Add(1)
}

func (s *stats) reset() {
	for i := range s.hist {
		s.hist[i].Store(0)
	}
	s.count.Store(0)
	s.gaps.Store(0)
	s.resyncs.Store(0)
}

func (s *stats) quantiles(qs ...float64) []float64 {
	total := s.count.Load()
	out := make([]float64, len(qs))
	if total == 0 {
		return out
	}
	var seen uint64
	qi := 0
	for i := range s.hist {
		seen += s.hist[i].Load()
		for qi < len(qs) && float64(seen) >= qs[qi]*float64(total) {
			out[qi] = float64((i+1)*bucketUs) / 1000
			qi++
		}
		if qi == len(qs) {
			break
		}
	}
	return out
}

func (s *stats) maxMs() float64 {
	for i := len(s.hist) - 1; i >= 0; i-- {
		if s.hist[i].Load() > 0 {
			return float64((i+1)*bucketUs) / 1000
		}
	}
	return 0
}

const ring = 1 << 20

// eventTimes are the match events' times by seq, as seen on NATS.
type eventTimes struct {
	seq [ring]atomic.Int64
	ns  [ring]atomic.Int64
}

func (e *eventTimes) record(seq, ns int64) {
	e.ns[seq%ring].Store(ns)
	e.seq[seq%ring].Store(seq)
}

func (e *eventTimes) at(seq int64) (int64, bool) {
	ns := e.ns[seq%ring].Load()
	return ns, e.seq[seq%ring].Load() == seq
}

// follow tracks one subscriber's chain of messages.
type follow struct{ seq int64 }

func (f *follow) message(s, every *stats, times *eventTimes, m *mdv1.StreamOrderBookResponse) (first bool) {
	if snap := m.GetSnapshot(); snap != nil {
		first = f.seq == 0
		if m.GetResynced() {
			s.resyncs.Add(1)
		}
		f.seq = snap.GetSeq()
		return first
	}
	if d := m.GetDelta(); d != nil {
		if d.GetPrevSeq() != f.seq {
			s.gaps.Add(1)
		}
		f.seq = d.GetSeq()
		if len(d.GetBids())+len(d.GetAsks()) > 0 {
			now := time.Now().UnixNano()
			t := d.GetUpdateTime()
			s.observeAt(now, t.GetSeconds()*1_000_000_000+int64(t.GetNanos()))
			for seq := d.GetPrevSeq() + 1; seq <= d.GetSeq(); seq++ {
				if ns, ok := times.at(seq); ok {
					every.observeAt(now, ns)
				}
			}
		}
	}
	return false
}

type load struct {
	market, natsURL string
	depth           int32
	conns           []*grpc.ClientConn
	natsConns       []*nats.Conn
	stats           stats
	every           stats
	times           eventTimes
	cancel          []context.CancelFunc
	subs            []*nats.Subscription
	ready           chan struct{}
	wg              sync.WaitGroup
}

func (l *load) grpcTo(n int) {
	for len(l.cancel) < n {
		conn := l.conns[len(l.cancel)%len(l.conns)]
		ctx, cancel := context.WithCancel(context.Background())
		l.cancel = append(l.cancel, cancel)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			client := mdv1.NewMarketDataServiceClient(conn)
			stream, err := client.StreamOrderBook(ctx, &mdv1.StreamOrderBookRequest{Market: l.market, Depth: l.depth})
			if err != nil {
				fmt.Fprintln(os.Stderr, "StreamOrderBook:", err)
				l.ready <- struct{}{}
				return
			}
			var f follow
			signalled := false
			for {
				m, err := stream.Recv()
				if err != nil {
					if ctx.Err() == nil {
						fmt.Fprintln(os.Stderr, "stream ended:", err)
					}
					if !signalled {
						l.ready <- struct{}{}
					}
					return
				}
				if f.message(&l.stats, &l.every, &l.times, m) && !signalled {
					signalled = true
					l.ready <- struct{}{}
				}
			}
		}()
	}
}

func (l *load) natsTo(n int) error {
	for len(l.subs) < n {
		conn := l.natsConns[len(l.subs)%len(l.natsConns)]
		var f follow
		var mu sync.Mutex
		sub, err := conn.Subscribe("md."+l.market+".book", func(msg *nats.Msg) {
			var m mdv1.StreamOrderBookResponse
			if proto.Unmarshal(msg.Data, &m) != nil {
				return
			}
			mu.Lock()
			if f.seq == 0 && m.GetDelta() != nil {
				f.seq = m.GetDelta().GetPrevSeq() // joined mid-chain
			}
			f.message(&l.stats, &l.every, &l.times, &m)
			mu.Unlock()
		})
		if err != nil {
			return err
		}
		if err := sub.SetPendingLimits(-1, -1); err != nil {
			return err
		}
		l.subs = append(l.subs, sub)
	}
	for _, c := range l.natsConns {
		if err := c.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func (l *load) close() {
	for _, c := range l.cancel {
		c()
	}
	l.wg.Wait()
	l.cancel = nil
	for _, s := range l.subs {
		_ = s.Unsubscribe()
	}
	l.subs = nil
}

func usage() (cpuS, rssMB float64) {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	cpuS = float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
	data, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			rssMB = kb / 1024
		}
	}
	return cpuS, rssMB
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "market data, host:port (several: comma-separated, round robin)")
	natsURL := flag.String("nats", "", "NATS URL (for nats N)")
	market := flag.String("market", "BENCH-USDT", "market")
	depth := flag.Int("depth", 20, "StreamOrderBook depth")
	conns := flag.Int("conns", 8, "gRPC connections (and NATS connections) the subscribers share")
	flag.Parse()

	l := &load{market: *market, natsURL: *natsURL, depth: int32(*depth), ready: make(chan struct{}, 1<<16)}
	l.stats.hist = make([]atomic.Uint64, buckets)
	l.every.hist = make([]atomic.Uint64, buckets)
	// Several targets (host:port,host:port): the streams spread over them by the
	// client's own round robin, as a mesh without a proxy would (no Envoy hop).
	dial, options := *target, []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
	}
	var addresses []resolver.Address
	if strings.Contains(dial, ",") {
		for _, a := range strings.Split(dial, ",") {
			addresses = append(addresses, resolver.Address{Addr: a})
		}
		dial = "mdload:///replicas"
		options = append(options, grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`))
	}
	for range *conns {
		connOptions := options
		if addresses != nil {
			r := manual.NewBuilderWithScheme("mdload")
			r.InitialState(resolver.State{Addresses: addresses})
			connOptions = append(append([]grpc.DialOption{}, options...), grpc.WithResolvers(r))
		}
		conn, err := grpc.NewClient(dial, connOptions...)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		l.conns = append(l.conns, conn)
		if *natsURL != "" {
			nc, err := nats.Connect(*natsURL, nats.MaxReconnects(-1))
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			l.natsConns = append(l.natsConns, nc)
		}
	}
	if len(l.natsConns) > 0 {
		_, err := l.natsConns[0].Subscribe("match.events."+l.market, func(msg *nats.Msg) {
			// One EventBatch per message, as match publishes (the publisher sends one
			// event per batch, so the header marks that event).
			var batch matchv1.EventBatch
			if msg.Header.Get("Bench-Visible") != "" && proto.Unmarshal(msg.Data, &batch) == nil {
				for _, e := range batch.GetEvents() {
					t := e.GetEventTime()
					l.times.record(e.GetSeq(), t.GetSeconds()*1_000_000_000+int64(t.GetNanos()))
				}
			}
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		fields := strings.Fields(in.Text())
		if len(fields) == 0 {
			continue
		}
		arg := 0
		if len(fields) > 1 {
			arg, _ = strconv.Atoi(fields[1])
		}
		switch fields[0] {
		case "grpc":
			want := arg - len(l.cancel)
			l.grpcTo(arg)
			for range want {
				<-l.ready
			}
			fmt.Println("ok")
		case "nats":
			if err := l.natsTo(arg); err != nil {
				fmt.Println("error", err)
				continue
			}
			fmt.Println("ok")
		case "close":
			l.close()
			fmt.Println("ok")
		case "reset":
			l.stats.reset()
			l.every.reset()
			fmt.Println("ok")
		case "report":
			q, e := l.stats.quantiles(0.5, 0.99), l.every.quantiles(0.5, 0.99)
			cpu, rss := usage()
			fmt.Printf("report %d %.2f %.2f %.2f %d %d %.2f %.1f %d %.2f %.2f %.2f\n", l.stats.count.Load(), q[0], q[1],
				l.stats.maxMs(), l.stats.gaps.Load(), l.stats.resyncs.Load(), cpu, rss,
				l.every.count.Load(), e[0], e[1], l.every.maxMs())
		default:
			fmt.Println("error unknown command", fields[0])
		}
	}
	l.close()
}
