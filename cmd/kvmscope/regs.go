package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

// regsCommand changes vCPU registers (KVM, run --allow-write).
func regsCommand() *cli.Command {
	return &cli.Command{
		Name:            "regs",
		Usage:           "change vCPU registers: regs set --vcpu N rax=0x1 [r15=5 ...] | lstar=0x...",
		HideHelpCommand: true,
		Subcommands: []*cli.Command{{
			Name:      "set",
			Usage:     "write general registers (rax..r15, rip, rflags) or MSRs (lstar, kernel_gs_base, ...) of one vCPU, with the VM paused",
			ArgsUsage: "NAME=VALUE...",
			Description: "Needs a VM under 'kvmscope run --allow-write' (or attach --ptrace --allow-write)\n" +
				"with KVM. Values are numbers (0x hex, decimal). General registers go through\n" +
				"kvm_run; the MSRs " + strings.Join(guestmem.MSRNames, " ") + "\n" +
				"through KVM_SET_MSRS run as QEMU; one request writes one kind. Prints each\n" +
				"register before and after, and what a fresh read showed once the guest ran\n" +
				"again. See docs/writable.md.",
			Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag,
				&cli.IntFlag{Name: "vcpu", Usage: "the vCPU id (kvmscope vm lists them); required"},
			},
			Action: func(c *cli.Context) error {
				args, err := trailingFlags(c, c.Args().Slice())
				if err != nil {
					return cli.Exit(err.Error(), 2)
				}
				if !c.IsSet("vcpu") {
					return cli.Exit("say which vCPU: --vcpu N", 2)
				}
				set, err := registerArgs(args)
				if err != nil {
					return cli.Exit(err.Error(), 2)
				}
				cl, err := client(c)
				if err != nil {
					return err
				}
				cx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				var w session.RegisterWrite
				if err := cl.PutJSON(cx, fmt.Sprintf("/v1/registers?vcpu=%d", c.Int("vcpu")), set, &w); err != nil {
					return cli.Exit(err.Error(), 1)
				}
				if c.Bool("json") {
					return printJSON(w)
				}
				printRegisterWrite(w)
				return nil
			},
		}},
	}
}

// trailingFlags parses the command's flags given among or after the
// registers (regs set rax=1 --vcpu 0 --api S), which urfave/cli leaves in
// the arguments, and returns the arguments without them.
func trailingFlags(c *cli.Context, args []string) ([]string, error) {
	fs := flag.NewFlagSet(c.Command.Name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, f := range c.Command.Flags {
		if err := f.Apply(fs); err != nil {
			return nil, err
		}
	}
	var rest []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if args = fs.Args(); len(args) > 0 {
			rest, args = append(rest, args[0]), args[1:]
		}
	}
	var err error
	fs.Visit(func(f *flag.Flag) { err = errors.Join(err, c.Set(f.Name, f.Value.String())) })
	return rest, err
}

// registerArgs parses NAME=VALUE arguments (names as the API takes them,
// lower-case; checked by the server).
func registerArgs(args []string) (map[string]api.Hex64, error) {
	if len(args) == 0 {
		return nil, fmt.Errorf("give registers to write, e.g. rax=0x1")
	}
	set := map[string]api.Hex64{}
	for _, a := range args {
		name, val, ok := strings.Cut(a, "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("%q: want NAME=VALUE, e.g. rax=0x1", a)
		}
		v, err := strconv.ParseUint(val, 0, 64)
		if err != nil {
			return nil, fmt.Errorf("%q: %q is not a 64-bit number (0x hex or decimal)", a, val)
		}
		name = strings.ToLower(name)
		if _, dup := set[name]; dup {
			return nil, fmt.Errorf("register %s given twice", name)
		}
		set[name] = api.Hex64(v)
	}
	return set, nil
}

func printRegisterWrite(w session.RegisterWrite) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 8, 2, ' ', 0)
	for _, name := range slices.Concat(guestmem.RegisterNames, guestmem.MSRNames) {
		if nv, ok := w.New[name]; ok {
			fmt.Fprintf(tw, "%s\t%s\t->\t%s\n", name, w.Old[name], nv)
		}
	}
	tw.Flush()
	if w.Pauses > 1 {
		fmt.Printf("paused %d times: the vCPU was in the middle of an I/O exit\n", w.Pauses)
	}
	b := w.Readback
	switch {
	case b == nil:
	case b.Error != "":
		fmt.Printf("read back: none: %s\n", b.Error)
	case !b.Fresh:
		fmt.Println("read back: the vCPU did not answer a kick (values of its last exit)")
	default:
		var changed []string
		for name, v := range b.Changed {
			changed = append(changed, name+"="+v)
		}
		slices.Sort(changed)
		fmt.Printf("read back: as written: %s; changed since: %s\n", orNone(b.Held), orNone(changed))
	}
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, " ")
}
