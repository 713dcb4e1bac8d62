// gobaseline: the speed anchor of `make bench` (not exactly-once). The
// straightforward pipeline per order, written with nats.go: consume from a
// durable pull consumer, decode the protobuf order, create the order's KV record,
// publish the encoded result with its own Nats-Msg-Id and await its PubAck, ack.
// A crash between the KV create and the publish loses the outcome; the worker
// does not have that hole. Prints one JSON line: orders, seconds, orders/s.
//
// --protocol outcome does the worker's own protocol instead, for comparison:
// one conditional publish of the result on <outcome-prefix>.processed.<key>,
// accepted only if <outcome-prefix>.*.<key> has no message yet, then ack.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/encoding/protowire"
)

// orderID reads field 1 (order_id) of an orders.v1.OrderCreated.
func orderID(b []byte) (string, error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return "", protowire.ParseError(m)
			}
			return string(v), nil
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return "", protowire.ParseError(m)
		}
		b = b[m:]
	}
	return "", errors.New("no order_id")
}

// result encodes an orders.v1.OrderProcessed with order_id and worker.
func result(id string) []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendString(b, id)
	b = protowire.AppendTag(b, 6, protowire.BytesType)
	b = protowire.AppendString(b, "gobaseline")
	return b
}

func main() {
	url := flag.String("url", nats.DefaultURL, "NATS URL")
	stream := flag.String("stream", "GOBENCH", "input stream")
	consumer := flag.String("consumer", "workers", "durable pull consumer")
	bucket := flag.String("bucket", "GOBENCH_STATE", "KV bucket")
	subject := flag.String("result-subject", "GOB.processed", "result subject")
	count := flag.Int64("count", 20000, "orders to process, then exit")
	inflight := flag.Int("inflight", 100, "orders in flight (also the pull batch)")
	protocol := flag.String("protocol", "anchor", "anchor (KV create, result with Nats-Msg-Id, ack) or outcome (the worker's: one conditional publish, ack)")
	outcomePrefix := flag.String("outcome-prefix", "GOS", "--protocol outcome: the outcome subjects' prefix")
	flag.Parse()
	if *protocol != "anchor" && *protocol != "outcome" {
		fmt.Fprintln(os.Stderr, "gobaseline: --protocol must be anchor or outcome")
		os.Exit(2)
	}

	nc, err := nats.Connect(*url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobaseline:", err)
		os.Exit(1)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobaseline:", err)
		os.Exit(1)
	}
	ctx := context.Background()
	cons, err := js.Consumer(ctx, *stream, *consumer)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobaseline: consumer:", err)
		os.Exit(1)
	}
	var kv jetstream.KeyValue
	if *protocol == "anchor" {
		if kv, err = js.KeyValue(ctx, *bucket); err != nil {
			fmt.Fprintln(os.Stderr, "gobaseline: bucket:", err)
			os.Exit(1)
		}
	}
	iter, err := cons.Messages(jetstream.PullMaxMessages(*inflight))
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobaseline: pull:", err)
		os.Exit(1)
	}
	// The write of one order's outcome, by protocol.
	write := func(key, id string) error {
		if *protocol == "outcome" {
			out := nats.NewMsg(*outcomePrefix + ".processed." + key)
			out.Data = result(id)
			out.Header.Set("Nats-Expected-Last-Subject-Sequence-Subject", *outcomePrefix+".*."+key)
			_, err := js.PublishMsg(ctx, out, jetstream.WithExpectLastSequencePerSubject(0))
			return err
		}
		if _, err := kv.Create(ctx, key, []byte("processed")); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
			return err
		}
		_, err := js.Publish(ctx, *subject, result(id), jetstream.WithMsgID(id+":processed"))
		return err
	}
	var done, failed atomic.Int64
	sem := make(chan struct{}, *inflight)
	var wg sync.WaitGroup
	start := time.Now()
	for done.Load()+int64(len(sem)) < *count {
		msg, err := iter.Next()
		if err != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(m jetstream.Msg) {
			defer func() { <-sem; wg.Done() }()
			id, err := orderID(m.Data())
			if err != nil {
				failed.Add(1)
				_ = m.Term()
				return
			}
			key := "x" + hex.EncodeToString([]byte(id))
			if err := write(key, id); err != nil {
				failed.Add(1)
				_ = m.Nak()
				return
			}
			if err := m.Ack(); err != nil {
				failed.Add(1)
				return
			}
			done.Add(1)
		}(msg)
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	iter.Stop()
	// Its own CPU time (user + system), so the caller need not poll /proc.
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	out, _ := json.Marshal(map[string]any{
		"orders": done.Load(), "failed": failed.Load(), "seconds": secs, "cpu_seconds": cpu.Seconds(),
		"rate": float64(done.Load()) / secs, "inflight": *inflight, "protocol": *protocol,
	})
	fmt.Println(string(out))
}
