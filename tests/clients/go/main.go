// fluent-send sends Docker-style events to sluice with fluent-logger-golang, the library
// behind Docker's fluentd log driver, in its sync, async or RequestAck mode.
//
// Each record is a map of strings, as the Docker driver sends, plus `seq` and `client`
// so the tests can check that every event arrived exactly once.
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
)

func main() {
	port := flag.Int("port", 24224, "sluice's forward port on 127.0.0.1")
	tag := flag.String("tag", "docker.app", "event tag")
	count := flag.Int("count", 100, "events to send")
	mode := flag.String("mode", "sync", "sync, async or ack")
	flag.Parse()

	cfg := fluent.Config{
		FluentHost:         "127.0.0.1",
		FluentPort:         *port,
		SubSecondPrecision: true,
		Timeout:            10 * time.Second,
		WriteTimeout:       30 * time.Second,
		MaxRetry:           3,
	}
	switch *mode {
	case "sync":
	case "async":
		cfg.Async = true
	case "ack":
		cfg.RequestAck = true
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", *mode)
		os.Exit(2)
	}
	logger, err := fluent.New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	for i := 0; i < *count; i++ {
		record := map[string]string{
			"container_id":   "4f1a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8",
			"container_name": "/web-1",
			"source":         "stdout",
			"log":            fmt.Sprintf("GET /item/%d HTTP/1.1 200", i),
			"seq":            strconv.Itoa(i),
			"client":         "go-" + *mode,
		}
		if err := logger.PostWithTime(*tag, time.Now(), record); err != nil {
			fmt.Fprintln(os.Stderr, "post:", err)
			os.Exit(1)
		}
	}
	if err := logger.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		os.Exit(1)
	}
}
