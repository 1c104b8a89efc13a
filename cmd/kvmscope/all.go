package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

// Every VM on a host: list, the --all fan-out of ps/lsmod/report and the
// exporter find the VMs by the API sockets in the socket directories.

var dirFlag = &cli.StringSliceFlag{Name: "dir", Usage: "socket directory to look for VMs in (repeatable); default: socket_dir of /etc/kvmscope/config.yaml, then kvmscope run's default directory"}
var jobsFlag = &cli.IntFlag{Name: "jobs", Value: 4, Usage: "how many VMs are read at once (with --all, and list)"}
var allFlag = &cli.BoolFlag{Name: "all", Usage: "every VM in the socket directories (--dir), read concurrently (--jobs); one table with a VM column"}

// fleetDirs are the directories --dir names, else where --vm NAME looks.
func fleetDirs(c *cli.Context) []string {
	if d := c.StringSlice("dir"); len(d) > 0 {
		return d
	}
	return launch.SocketDirs()
}

// findVMs scans the socket directories. A directory that cannot be read
// is said on stderr; one named with --dir that does not exist is an error.
func findVMs(c *cli.Context) ([]api.FleetSocket, error) {
	dirs := fleetDirs(c)
	for _, d := range c.StringSlice("dir") {
		if _, err := os.Stat(d); err != nil {
			return nil, cli.Exit(fmt.Sprintf("--dir %s: %v", d, errors.Unwrap(err)), 1)
		}
	}
	socks, errs := api.ScanSockets(dirs...)
	for _, err := range errs {
		fmt.Fprintf(os.Stderr, "kvmscope: warning: %v\n", err)
	}
	if len(socks) == 0 {
		fmt.Fprintf(os.Stderr, "kvmscope: no VM sockets in %s\n", strings.Join(dirs, ", "))
	}
	return socks, nil
}

// fanOut runs f on every socket, at most jobs at once, and returns the
// results in the sockets' order.
func fanOut[T any](socks []api.FleetSocket, jobs int, f func(api.FleetSocket) T) []T {
	out := make([]T, len(socks))
	sem := make(chan struct{}, max(jobs, 1))
	var wg sync.WaitGroup
	for i, s := range socks {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out[i] = f(s)
		}()
	}
	wg.Wait()
	return out
}

// allEntry is one VM in the --all --json output: what was read, or why
// not.
type allEntry struct {
	VM        string          `json:"vm"`
	Socket    string          `json:"socket"`
	Processes json.RawMessage `json:"processes,omitempty"`
	Modules   *[]api.Module   `json:"modules,omitempty"`
	Report    *session.Report `json:"report,omitempty"`
	Warnings  []string        `json:"warnings,omitempty"`
	Error     string          `json:"error,omitempty"`

	stale bool
}

// orAll runs all when --all is given, else one.
func orAll(all, one cli.ActionFunc) cli.ActionFunc {
	return func(c *cli.Context) error {
		if !c.Bool("all") {
			if c.IsSet("dir") || c.IsSet("jobs") {
				return cli.Exit("--dir and --jobs go with --all", 2)
			}
			return one(c)
		}
		if c.String("api") != "" || c.String("vm") != "" || c.String("core") != "" {
			return cli.Exit("give either --all or --api/--vm/--core, not both", 2)
		}
		if c.Int("jobs") < 1 {
			return cli.Exit(fmt.Sprintf("bad --jobs %d: want 1 or more", c.Int("jobs")), 2)
		}
		return all(c)
	}
}

// readAll reads every VM with read, at most --jobs at once, each within
// the same time a single read has. A stale socket is skipped with a note;
// a VM that fails gets an error line on stderr (and its error in --json).
// The exit status is 1 only when every VM that is not stale failed.
func readAll(c *cli.Context, read func(ctx context.Context, g *liveGuest, e *allEntry) error) ([]allEntry, error) {
	socks, err := findVMs(c)
	if err != nil {
		return nil, err
	}
	res := fanOut(socks, c.Int("jobs"), func(s api.FleetSocket) allEntry {
		e := allEntry{VM: s.Name, Socket: s.Path}
		if err := api.ProbeSocket(s.Path, 2*time.Second); err != nil {
			e.Error, e.stale = err.Error(), errors.Is(err, api.ErrStale)
			return e
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := read(ctx, &liveGuest{c: api.NewClient(s.Path)}, &e); err != nil {
			e.Error = err.Error()
		}
		return e
	})
	var out []allEntry
	failed := 0
	for _, e := range res {
		switch {
		case e.stale:
			fmt.Fprintf(os.Stderr, "kvmscope: VM %s: %s (%s), skipped\n", e.VM, e.Error, e.Socket)
			continue
		case e.Error != "":
			fmt.Fprintf(os.Stderr, "kvmscope: VM %s: %s\n", e.VM, e.Error)
			failed++
		}
		for _, w := range e.Warnings {
			fmt.Fprintf(os.Stderr, "kvmscope: VM %s: warning: %s\n", e.VM, w)
		}
		out = append(out, e)
	}
	if failed > 0 && failed == len(out) {
		return out, cli.Exit(fmt.Sprintf("every VM failed (%d)", failed), 1)
	}
	return out, nil
}

// finishAll prints --json (even when every VM failed: the errors are the
// result) and passes the exit status on.
func finishAll(c *cli.Context, out []allEntry, err error, table func(tw *tabwriter.Writer, e allEntry) error) error {
	if out == nil && err != nil {
		return err
	}
	if c.Bool("json") {
		if out == nil {
			out = []allEntry{}
		}
		if perr := printJSON(out); perr != nil {
			return perr
		}
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	for _, e := range out {
		if e.Error != "" {
			continue
		}
		if terr := table(tw, e); terr != nil {
			return cli.Exit(terr.Error(), 1)
		}
	}
	tw.Flush()
	return err
}

func psAll(c *cli.Context) error {
	threads, consistent := c.Bool("threads"), c.Bool("consistent")
	out, err := readAll(c, func(ctx context.Context, g *liveGuest, e *allEntry) error {
		var b bytes.Buffer
		ws, err := g.processesJSON(ctx, threads, consistent, &b)
		if err != nil {
			return err
		}
		if !json.Valid(b.Bytes()) {
			return errors.New("the process list is not valid JSON")
		}
		e.Processes, e.Warnings = b.Bytes(), ws
		return nil
	})
	if c.Bool("tree") && !c.Bool("json") {
		for _, e := range out {
			var ps []api.Process
			if e.Error != "" || json.Unmarshal(e.Processes, &ps) != nil {
				continue
			}
			fmt.Printf("VM %s:\n", e.VM)
			printTree(ps)
		}
		return err
	}
	header := false
	return finishAll(c, out, err, func(tw *tabwriter.Writer, e allEntry) error {
		if !header {
			if threads {
				fmt.Fprintln(tw, "VM\tPID\tTGID\tPPID\tUID\tGID\tSTAT\tCOMM\tCMDLINE")
			} else {
				fmt.Fprintln(tw, "VM\tPID\tPPID\tUID\tGID\tSTAT\tTHR\tCOMM\tCMDLINE")
			}
			header = true
		}
		var ps []api.Process
		if err := json.Unmarshal(e.Processes, &ps); err != nil {
			return fmt.Errorf("VM %s: %v", e.VM, err)
		}
		vm := printable(e.VM, 40)
		for _, p := range ps {
			cmd := printable(strings.Join(p.Cmdline, " "), 200)
			if p.KThread {
				cmd = "[" + p.Comm + "]"
			}
			if threads {
				fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", vm, p.PID, p.TGID, p.PPID, p.UID, p.GID, p.State, printable(p.Comm, 16), cmd)
			} else {
				fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%d\t%s\t%s\n", vm, p.PID, p.PPID, p.UID, p.GID, p.State, p.Threads, printable(p.Comm, 16), cmd)
			}
		}
		return nil
	})
}

func lsmodAll(c *cli.Context) error {
	out, err := readAll(c, func(ctx context.Context, g *liveGuest, e *allEntry) error {
		var ms []api.Module
		ws, err := getWarned(ctx, g.c, "/v1/modules", &ms)
		if err != nil {
			return err
		}
		if ms == nil {
			ms = []api.Module{}
		}
		e.Modules, e.Warnings = &ms, ws
		return nil
	})
	header := false
	return finishAll(c, out, err, func(tw *tabwriter.Writer, e allEntry) error {
		if !header {
			fmt.Fprintln(tw, "VM\tMODULE\tSIZE\tBASE\tSTATE")
			header = true
		}
		for _, m := range *e.Modules {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%#x\t%s\n", printable(e.VM, 40), m.Name, m.Size, uint64(m.Base), m.State)
		}
		return nil
	})
}

func reportAll(c *cli.Context) error {
	if c.String("rules") != "" {
		return cli.Exit("a running VM is judged by its own rule base (kvmscope run --rules FILE); --rules is for --core", 2)
	}
	cached := c.Bool("cached")
	out, err := readAll(c, func(ctx context.Context, g *liveGuest, e *allEntry) error {
		rep, err := g.report(ctx, nil, cached)
		if err != nil {
			return err
		}
		e.Report, e.Warnings = rep, rep.Warnings
		return nil
	})
	header := false
	return finishAll(c, out, err, func(tw *tabwriter.Writer, e allEntry) error {
		if !header {
			fmt.Fprintln(tw, "VM\tSEVERITY\tRULE\tKIND\tFINDING\tFIRST SEEN\tLAST SEEN\tACTIVE")
			header = true
		}
		for _, f := range e.Report.Findings {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%v\n", printable(e.VM, 40), f.Severity, f.Rule, f.Kind, f.Summary,
				f.FirstSeen.Local().Format(time.DateTime), f.LastSeen.Local().Format(time.DateTime), f.Active)
		}
		return nil
	})
}
