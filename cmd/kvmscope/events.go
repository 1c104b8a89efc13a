package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/urfave/cli/v2"
)

// eventsCommand prints the VM's event stream: what kvmscope decided and
// saw (ioctl policy decisions, failed foreign-ABI calls, ...).
func eventsCommand() *cli.Command {
	return &cli.Command{
		Name:  "events",
		Usage: "print the VM's events (policy decisions, ...); --follow waits for new ones",
		Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag,
			&cli.Uint64Flag{Name: "since", Usage: "only events after this sequence number"},
			&cli.BoolFlag{Name: "follow", Aliases: []string{"f"}, Usage: "keep printing new events until interrupted"},
		},
		Action: func(c *cli.Context) error { return followLog(c, "/v1/events", "events", eventLine) },
	}
}

// followLog prints the entries of a VM's log served at path (the event
// log, the blocked-write log) after --since, one per line (raw with
// --json), and with --follow keeps waiting for new ones.
func followLog(c *cli.Context, path, what string, line func(json.RawMessage) string) error {
	cl, err := client(c)
	if err != nil {
		return err
	}
	cx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	since := c.Uint64("since")
	for {
		wait := ""
		if c.Bool("follow") {
			wait = "&wait=30"
		}
		var evs api.Events
		rcx, cancel := context.WithTimeout(cx, 55*time.Second)
		err := cl.Get(rcx, fmt.Sprintf("%s?since=%d%s", path, since, wait), &evs)
		cancel()
		if cx.Err() != nil {
			return nil
		}
		if err != nil {
			return cli.Exit(err.Error(), 1)
		}
		if evs.Lost {
			fmt.Fprintf(os.Stderr, "kvmscope: %s %d to %d were rotated out of the log before they were read\n", what, since+1, evs.Oldest-1)
		}
		for _, e := range evs.Events {
			if c.Bool("json") {
				fmt.Printf("%s\n", e)
			} else {
				fmt.Println(line(e))
			}
		}
		since = evs.Next
		if !c.Bool("follow") {
			return nil
		}
	}
}

// eventLine is one event for a terminal: seq, time, kind, then its other
// fields as key=value.
func eventLine(raw json.RawMessage) string {
	var e map[string]any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // seq and addresses print as integers
	if dec.Decode(&e) != nil {
		return string(raw)
	}
	var rest []string
	for k, v := range e {
		if k == "seq" || k == "time" || k == "kind" {
			continue
		}
		b, _ := json.Marshal(v)
		rest = append(rest, k+"="+string(b))
	}
	sort.Strings(rest)
	return fmt.Sprintf("%v\t%v\t%v\t%s", e["seq"], e["time"], e["kind"], strings.Join(rest, " "))
}
