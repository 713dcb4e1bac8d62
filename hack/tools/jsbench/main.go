// jsbench: the JetStream side of `make bench-operator`. The baseline creates,
// concurrently, the JetStream objects N pipelines have (input stream with its
// outcome subjects, dead-letter stream sourcing the dead-letter markers, KV
// bucket, durable pull consumer), as a plain nats.go program would; the probes
// wait for what the operator must achieve. Names follow the operator's
// defaults for pipeline i: stream <PREFIX><i> on <PREFIX><i>.* and
// <PREFIX><i>.*.*, <PREFIX><i>_DLQ, bucket <PREFIX><i>_STATE, consumer
// order-workers filtering <PREFIX><i>.created.
//
//	jsbench -server URL -prefix P -n N create|delete|wait-max-age|rm|wait-exist|wait-gone
//
// Prints one JSON line: what, count, seconds.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var (
	server   = flag.String("server", "nats://127.0.0.1:4222", "NATS URL")
	prefix   = flag.String("prefix", "P", "stream name prefix")
	n        = flag.Int("n", 10, "pipelines")
	parallel = flag.Int("parallel", 32, "requests in flight")
	maxAge   = flag.Duration("max-age", 2*time.Hour, "wait-max-age: the max age to wait for")
	every    = flag.Int("every", 10, "rm: remove the input stream of every k-th pipeline")
	timeout  = flag.Duration("timeout", 300*time.Second, "how long the wait-* probes wait")
)

func name(i int) string { return fmt.Sprintf("%s%d", *prefix, i) }

// each runs f for every pipeline, `parallel` at a time; the first error wins.
func each(f func(i int) error) error {
	sem := make(chan struct{}, *parallel)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for i := 0; i < *n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			if err := f(i); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	return first
}

func create(ctx context.Context, js jetstream.JetStream, i int) error {
	s := name(i)
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: s, Subjects: []string{s + ".*", s + ".*.*"}, Storage: jetstream.FileStorage,
		Duplicates: 2 * time.Minute, MaxAge: 24 * time.Hour,
	})
	if err != nil {
		return fmt.Errorf("stream %s: %w", s, err)
	}
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name: s + "_DLQ", Storage: jetstream.FileStorage, MaxAge: 7 * 24 * time.Hour,
		Sources: []*jetstream.StreamSource{{Name: s, FilterSubject: s + ".deadlettered.*"}},
	})
	if err != nil {
		return fmt.Errorf("stream %s_DLQ: %w", s, err)
	}
	if _, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: s + "_STATE", TTL: 24 * time.Hour}); err != nil {
		return fmt.Errorf("bucket %s_STATE: %w", s, err)
	}
	_, err = js.CreateOrUpdateConsumer(ctx, s, jetstream.ConsumerConfig{
		Durable: "order-workers", FilterSubject: s + ".created", AckPolicy: jetstream.AckExplicitPolicy,
		AckWait: 30 * time.Second, MaxDeliver: -1, MaxAckPending: 10,
	})
	if err != nil {
		return fmt.Errorf("consumer %s: %w", s, err)
	}
	return nil
}

func remove(ctx context.Context, js jetstream.JetStream, i int) error {
	s := name(i)
	for _, st := range []string{s, s + "_DLQ", "KV_" + s + "_STATE"} {
		if err := js.DeleteStream(ctx, st); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
			return fmt.Errorf("delete %s: %w", st, err)
		}
	}
	return nil
}

// waitAll polls until ok(i) holds for every pipeline, or the timeout.
func waitAll(ctx context.Context, what string, ok func(i int) bool) error {
	deadline := time.Now().Add(*timeout)
	pending := map[int]bool{}
	for i := 0; i < *n; i++ {
		pending[i] = true
	}
	for len(pending) > 0 {
		for i := range pending {
			if ok(i) {
				delete(pending, i)
			}
		}
		if len(pending) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %d of %d pipelines still waiting after %s", what, len(pending), *n, *timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

func run(ctx context.Context, js jetstream.JetStream, mode string) (int, error) {
	info := func(i int) (*jetstream.StreamInfo, error) {
		s, err := js.Stream(ctx, name(i))
		if err != nil {
			return nil, err
		}
		return s.Info(ctx)
	}
	switch mode {
	case "create":
		return *n, each(func(i int) error { return create(ctx, js, i) })
	case "delete":
		return *n, each(func(i int) error { return remove(ctx, js, i) })
	case "wait-max-age":
		return *n, waitAll(ctx, "max age "+maxAge.String(), func(i int) bool {
			si, err := info(i)
			return err == nil && si.Config.MaxAge == *maxAge
		})
	case "rm":
		count := 0
		for i := 0; i < *n; i += *every {
			if err := js.DeleteStream(ctx, name(i)); err != nil {
				return count, fmt.Errorf("delete %s: %w", name(i), err)
			}
			count++
		}
		return count, nil
	case "wait-exist":
		return *n, waitAll(ctx, "streams back", func(i int) bool {
			_, err := info(i)
			return err == nil
		})
	case "wait-gone":
		return *n, waitAll(ctx, "streams gone", func(i int) bool {
			_, err := js.Stream(ctx, name(i))
			return errors.Is(err, jetstream.ErrStreamNotFound)
		})
	}
	return 0, fmt.Errorf("unknown mode %q (create, delete, wait-max-age, rm, wait-exist, wait-gone)", mode)
}

func main() {
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: jsbench [flags] create|delete|wait-max-age|rm|wait-exist|wait-gone")
		os.Exit(2)
	}
	nc, err := nats.Connect(*server, nats.Name("jsbench"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "jsbench: connect %s: %v\n", *server, err)
		os.Exit(1)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		fmt.Fprintf(os.Stderr, "jsbench: %v\n", err)
		os.Exit(1)
	}
	ctx := context.Background()
	start := time.Now()
	count, err := run(ctx, js, flag.Arg(0))
	if err != nil {
		fmt.Fprintf(os.Stderr, "jsbench: %v\n", err)
		os.Exit(1)
	}
	out, _ := json.Marshal(map[string]any{"what": flag.Arg(0), "count": count, "seconds": time.Since(start).Seconds()})
	fmt.Println(string(out))
}
