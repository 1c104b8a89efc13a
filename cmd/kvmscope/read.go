package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/urfave/cli/v2"
)

var apiFlag = &cli.StringFlag{Name: "api", Usage: "API socket of a running 'kvmscope run'"}
var vmFlag = &cli.StringFlag{Name: "vm", Usage: "VM name (QEMU's -name, a libvirt domain's name): finds its socket in socket_dir of /etc/kvmscope/config.yaml, else kvmscope run's default directory"}
var jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print JSON"}

// client returns the API client named by --api or --vm.
func client(c *cli.Context) (*api.Client, error) {
	sock := c.String("api")
	if sock == "" && c.String("vm") != "" {
		// The config's socket_dir (libvirt domains under kvmscope-qemu),
		// then kvmscope run's default directory.
		sock = launch.FindSocket(c.String("vm"))
	}
	if sock == "" {
		return nil, cli.Exit("say which VM: --api SOCKET or --vm NAME", 2)
	}
	return api.NewClient(sock), nil
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// getJSON fetches path from the VM named by --api/--vm; errors come back
// as one line for the user.
func getJSON[T any](c *cli.Context, path string) (T, error) {
	var v T
	cl, err := client(c)
	if err != nil {
		return v, err
	}
	cx, cancel := ctx()
	defer cancel()
	if err := cl.Get(cx, path, &v); err != nil {
		return v, cli.Exit(err.Error(), 1)
	}
	return v, nil
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func vmCommand() *cli.Command {
	return &cli.Command{
		Name:  "vm",
		Usage: "describe the VM: QEMU pid, accelerator, vCPUs, memory map",
		Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag},
		Action: func(c *cli.Context) error {
			vm, err := getJSON[api.VM](c, "/v1/vm")
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(vm)
			}
			fmt.Printf("name:   %s\npid:    %d\naccel:  %s\nvcpus:  %d\nwrite:  %v\n", orDash(vm.Name), vm.Pid, vm.Accel, len(vm.VCPUs), vm.Writable)
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "\nGPA START\tGPA END\tSIZE\tKIND\tNAME")
			for _, r := range vm.Regions {
				kind := "ram"
				if r.ReadOnly {
					kind = "rom"
				}
				fmt.Fprintf(tw, "%#x\t%#x\t%s\t%s\t%s\n", uint64(r.GPA), uint64(r.GPA)+uint64(r.Size)-1, humanSize(uint64(r.Size)), kind, r.Name)
			}
			return tw.Flush()
		},
	}
}

func vcpusCommand() *cli.Command {
	return &cli.Command{
		Name:  "vcpus",
		Usage: "print each vCPU's registers, fresh",
		Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag},
		Action: func(c *cli.Context) error {
			cpus, err := getJSON[[]api.VCPU](c, "/v1/vcpus")
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(cpus)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tMODE\tRIP\tRSP\tCR0\tCR3\tCR4\tEFER")
			for _, v := range cpus {
				fmt.Fprintf(tw, "%d\t%s\t%#x\t%#x\t%#x\t%#x\t%#x\t%#x\n", v.ID, v.Mode, uint64(v.RIP), uint64(v.RSP), uint64(v.CR0), uint64(v.CR3), uint64(v.CR4), uint64(v.EFER))
			}
			return tw.Flush()
		},
	}
}

func memCommand() *cli.Command {
	return &cli.Command{
		Name:  "mem",
		Usage: "read guest physical memory",
		Flags: []cli.Flag{apiFlag, vmFlag,
			&cli.StringFlag{Name: "gpa", Usage: "guest physical address (e.g. 0x1000)", Required: true},
			&cli.StringFlag{Name: "len", Usage: "number of bytes", Value: "256"},
			&cli.BoolFlag{Name: "raw", Usage: "write raw bytes to stdout instead of a hexdump"},
		},
		Action: func(c *cli.Context) error {
			gpa, err := strconv.ParseUint(c.String("gpa"), 0, 64)
			if err != nil {
				return cli.Exit(fmt.Sprintf("bad --gpa %q: want a number such as 0x1000", c.String("gpa")), 2)
			}
			n, err := strconv.ParseUint(c.String("len"), 0, 64)
			if err != nil || n == 0 || n > api.MaxMemoryRead {
				return cli.Exit(fmt.Sprintf("bad --len %q: want 1..%d", c.String("len"), api.MaxMemoryRead), 2)
			}
			cl, err := client(c)
			if err != nil {
				return err
			}
			cx, cancel := ctx()
			defer cancel()
			q := url.Values{"gpa": {fmt.Sprintf("%#x", gpa)}, "len": {strconv.FormatUint(n, 10)}}
			b, err := cl.GetRaw(cx, "/v1/memory?"+q.Encode())
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			if c.Bool("raw") {
				_, err = os.Stdout.Write(b)
				return err
			}
			d := hex.Dumper(&offsetWriter{base: gpa})
			d.Write(b)
			d.Close()
			return nil
		},
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func humanSize(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dG", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dM", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dK", n>>10)
	}
	return strconv.FormatUint(n, 10)
}
