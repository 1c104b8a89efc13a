package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/urfave/cli/v2"
)

// listEntry is one VM as `kvmscope list --json` prints it. A stale or
// unreachable socket has name, socket, state and error only.
type listEntry struct {
	Name   string `json:"name"`
	Socket string `json:"socket"`
	// State is "up" (the VM answered), "stale" (nothing listens on the
	// socket) or "error" (it could not be asked: see Error).
	State     string `json:"state"`
	Error     string `json:"error,omitempty"`
	Pid       int    `json:"pid,omitempty"`
	TracerPid int    `json:"tracer_pid,omitempty"`
	Accel     string `json:"accel,omitempty"`
	VCPUs     int    `json:"vcpus,omitempty"`
	// MemoryBytes is the sum of the VM's RAM regions.
	MemoryBytes uint64 `json:"memory_bytes,omitempty"`
	// Kernel is the guest kernel's release, when discovery works; else
	// KernelError says why not.
	Kernel      string `json:"kernel,omitempty"`
	KernelError string `json:"kernel_error,omitempty"`
	// UptimeSeconds is the age of the QEMU process (from /proc/PID/stat).
	UptimeSeconds float64 `json:"uptime_seconds,omitempty"`
}

func listCommand() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list every VM kvmscope serves on this host (the API sockets in the socket directories)",
		Flags: []cli.Flag{jsonFlag, dirFlag, jobsFlag,
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "how long to wait for each VM"},
		},
		Action: func(c *cli.Context) error {
			if c.Int("jobs") < 1 {
				return cli.Exit(fmt.Sprintf("bad --jobs %d: want 1 or more", c.Int("jobs")), 2)
			}
			socks, err := findVMs(c)
			if err != nil {
				return err
			}
			timeout := c.Duration("timeout")
			vms := fanOut(socks, c.Int("jobs"), func(s api.FleetSocket) listEntry { return listVM(s, timeout) })
			if c.Bool("json") {
				if vms == nil {
					vms = []listEntry{}
				}
				return printJSON(vms)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tPID\tSOCKET\tACCEL\tVCPUS\tMEMORY\tKERNEL\tUPTIME")
			for _, v := range vms {
				if v.State != "up" {
					fmt.Fprintf(os.Stderr, "kvmscope: VM %s: %s, not listed\n", v.Name, v.Error)
					continue
				}
				up := "-"
				if v.UptimeSeconds > 0 {
					up = (time.Duration(v.UptimeSeconds) * time.Second).String()
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%s\t%s\t%s\n", printable(v.Name, 40), v.Pid, v.Socket, v.Accel, v.VCPUs,
					humanSize(v.MemoryBytes), orDash(v.Kernel), up)
			}
			return tw.Flush()
		},
	}
}

// listVM asks one VM for its shape and its kernel, at once, within
// timeout.
func listVM(s api.FleetSocket, timeout time.Duration) listEntry {
	e := listEntry{Name: s.Name, Socket: s.Path, State: "up"}
	if err := api.ProbeSocket(s.Path, timeout); err != nil {
		e.State, e.Error = "error", err.Error()
		if errors.Is(err, api.ErrStale) {
			e.State = "stale"
		}
		return e
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cl := api.NewClient(s.Path)
	var (
		vm     api.VM
		vmErr  error
		k      api.Kernel
		kerErr error
		wg     sync.WaitGroup
	)
	wg.Add(2)
	go func() { defer wg.Done(); vmErr = cl.Get(ctx, "/v1/vm", &vm) }()
	go func() { defer wg.Done(); kerErr = cl.Get(ctx, "/v1/kernel", &k) }()
	wg.Wait()
	if vmErr != nil {
		e.State, e.Error = "error", timeoutSays(vmErr, ctx, timeout)
		return e
	}
	e.Pid, e.TracerPid, e.Accel, e.VCPUs = vm.Pid, vm.TracerPid, vm.Accel, len(vm.VCPUs)
	for _, r := range vm.Regions {
		if !r.ReadOnly {
			e.MemoryBytes += uint64(r.Size)
		}
	}
	if kerErr != nil {
		e.KernelError = timeoutSays(kerErr, ctx, timeout)
	} else {
		e.Kernel = kernelRelease(k)
	}
	if up, err := processAge(vm.Pid); err == nil {
		e.UptimeSeconds = up.Seconds()
	}
	return e
}

// timeoutSays makes a request that ran out of time say so plainly.
func timeoutSays(err error, ctx context.Context, timeout time.Duration) string {
	if ctx.Err() != nil {
		return fmt.Sprintf("no answer within %v", timeout)
	}
	return err.Error()
}

// kernelRelease is the release in the kernel's banner ("Linux version
// 6.1.0-31-cloud-amd64 (...)"), as uname -r says it, else its version.
func kernelRelease(k api.Kernel) string {
	if rest, ok := strings.CutPrefix(k.Banner, "Linux version "); ok {
		if f := strings.Fields(rest); len(f) > 0 {
			return f[0]
		}
	}
	return k.Version
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture kvmscope runs on (x86-64).
const clockTicks = 100

// processAge is how long process pid has run: now (/proc/uptime) less its
// start time (field 22 of /proc/PID/stat, in clock ticks since boot).
func processAge(pid int) (time.Duration, error) {
	if pid <= 0 {
		return 0, errors.New("no pid")
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The comm field (2) may hold spaces and parentheses: fields count
	// from the last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("bad /proc/PID/stat")
	}
	f := strings.Fields(string(stat[i+1:])) // f[0] is field 3
	if len(f) < 20 {
		return 0, errors.New("short /proc/PID/stat")
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, err
	}
	ub, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0, err
	}
	uf := strings.Fields(string(ub))
	if len(uf) == 0 {
		return 0, errors.New("bad /proc/uptime")
	}
	up, err := strconv.ParseFloat(uf[0], 64)
	if err != nil {
		return 0, err
	}
	age := up - float64(start)/clockTicks
	if age < 0 {
		age = 0
	}
	return time.Duration(age * float64(time.Second)), nil
}
