// fluent-send sends Docker-style events to sluice with fluent-logger-golang, the library
// behind Docker's fluentd log driver, in its sync, async or RequestAck mode.
//
// Each record is a map of strings, as the Docker driver sends, plus `seq` and `client`
// so the tests can check that every event arrived exactly once.
//
// With -rate it sends steadily, as a container logs, and with -keep-going it rides out
// sluice restarts: a post that fails after its retries is reported ("failed SEQ" on
// stdout) and the next one goes on. It ends by printing "posted N" (in ack mode, N
// events were acked).
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
	rate := flag.Int("rate", 0, "events per second (0: as fast as possible)")
	keepGoing := flag.Bool("keep-going", false, "report a failed post and go on")
	flag.Parse()

	cfg := fluent.Config{
		FluentHost:         "127.0.0.1",
		FluentPort:         *port,
		SubSecondPrecision: true,
		Timeout:            10 * time.Second,
		WriteTimeout:       30 * time.Second,
		MaxRetry:           3,
	}
	if *keepGoing {
		// Ride out a restart: retry for about half a minute.
		cfg.MaxRetry = 40
		cfg.RetryWait = 100
		cfg.MaxRetryWait = 1000
		cfg.Timeout = 2 * time.Second
		cfg.WriteTimeout = 5 * time.Second
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
	posted := 0
	start := time.Now()
	for i := 0; i < *count; i++ {
		if *rate > 0 {
			due := start.Add(time.Duration(i) * time.Second / time.Duration(*rate))
			time.Sleep(time.Until(due))
		}
		record := map[string]string{
			"container_id":   "4f1a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8",
			"container_name": "/web-1",
			"source":         "stdout",
			"log":            fmt.Sprintf("GET /item/%d HTTP/1.1 200", i),
			"seq":            strconv.Itoa(i),
			"client":         "go-" + *mode,
		}
		if err := logger.PostWithTime(*tag, time.Now(), record); err != nil {
			if *keepGoing {
				fmt.Printf("failed %d\n", i)
				fmt.Fprintln(os.Stderr, "post:", err)
				continue
			}
			fmt.Fprintln(os.Stderr, "post:", err)
			os.Exit(1)
		}
		posted++
	}
	fmt.Printf("posted %d\n", posted)
	if err := logger.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		os.Exit(1)
	}
}
