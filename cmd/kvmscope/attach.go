package main

import (
	"context"
	"fmt"
	"time"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/urfave/cli/v2"
)

// attachCommand serves the API of a QEMU that is already running, read
// only, through its QMP socket: no ptrace, nothing changed in QEMU
// (docs/attach.md).
func attachCommand() *cli.Command {
	return &cli.Command{
		Name:  "attach",
		Usage: "serve the API of a running QEMU, read-only, through its QMP socket or libvirt (no restart, no ptrace); Ctrl-C or SIGTERM detaches",
		UsageText: "kvmscope attach --pid PID [--qmp SOCKET] [--ptrace [--allow-write]] [--api S] [--name N]\n" +
			"kvmscope attach --vm DOMAIN [--connect URI] [--ptrace [--allow-write]] [--api S]",
		Flags: append([]cli.Flag{
			&cli.IntFlag{Name: "pid", Usage: "QEMU's process id (with --vm: default from libvirt's pid file)"},
			&cli.StringFlag{Name: "qmp", Usage: "a QMP socket of that QEMU that nothing else is connected to (-qmp unix:PATH,server=on,wait=off); without one, guest RAM is found from QEMU's command line and mappings (guests up to 2 GiB) and registers need --ptrace"},
			&cli.StringFlag{Name: "vm", Usage: "a running libvirt domain: its monitor through virsh qemu-monitor-command (libvirt marks the domain tainted)"},
			&cli.StringFlag{Name: "connect", Value: "qemu:///system", Usage: "the libvirt connection of --vm"},
			&cli.BoolFlag{Name: "ptrace", Usage: "also trace QEMU (KVM only; no filter, no policy): fresh registers from kvm_run, pauses of every thread, and writes with --allow-write; detach lets it go as it was"},
			&cli.BoolFlag{Name: "allow-write", Usage: "with --ptrace: allow writes to guest memory and vCPU registers through the API"},
			&cli.StringFlag{Name: "api", Usage: "the API socket to serve (default: the socket directory's NAME.sock)"},
			&cli.StringFlag{Name: "name", Usage: "the VM's name (default: the domain's with --vm, else qemu-PID)"},
		}, scanFlags()...),
		Action: func(c *cli.Context) error {
			switch {
			case c.String("vm") != "" && c.String("qmp") != "":
				return cli.Exit("kvmscope attach: --vm or --qmp, not both", 2)
			case c.String("vm") == "" && c.Int("pid") == 0:
				return cli.Exit("kvmscope attach: give --pid PID [--qmp SOCKET], or --vm DOMAIN (a libvirt domain)", 2)
			case c.Bool("allow-write") && !c.Bool("ptrace"):
				return cli.Exit("kvmscope attach: --allow-write needs --ptrace (writes are made with QEMU paused, which takes the trace)", 2)
			}
			set, scan, err := scanPolicy(c)
			if err != nil {
				return err
			}
			err = launch.Attach(launch.AttachOptions{
				PID: c.Int("pid"), QMP: c.String("qmp"), Domain: c.String("vm"), URI: c.String("connect"), Ptrace: c.Bool("ptrace"), AllowWrite: c.Bool("allow-write"), Socket: c.String("api"), Name: c.String("name"),
				Judging: launch.Judging{Rules: set, RulesPath: c.String("rules"), Scan: scan}, Log: log,
			})
			if err != nil {
				return cli.Exit("kvmscope attach: "+err.Error(), 1)
			}
			return nil
		},
	}
}

// detachCommand ends a `kvmscope attach`: QEMU runs on as it was.
func detachCommand() *cli.Command {
	return &cli.Command{
		Name:  "detach",
		Usage: "end a kvmscope attach, leaving QEMU as it was (a VM launched under kvmscope run cannot be detached)",
		Flags: []cli.Flag{apiFlag, vmFlag},
		Action: func(c *cli.Context) error {
			cl, err := client(c)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var out map[string]bool
			if err := cl.Post(ctx, "/v1/detach", &out); err != nil {
				return cli.Exit(err.Error(), 1)
			}
			fmt.Println("detached")
			return nil
		},
	}
}
