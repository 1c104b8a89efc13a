package main

import (
	"context"
	"fmt"
	"syscall"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

// killCommand kills a guest process from inside the guest.
func killCommand() *cli.Command {
	return &cli.Command{
		Name:      "kill",
		Usage:     "kill a guest process with SIGKILL, made by a guest root process's kill(2) (run --allow-write, TCG or KVM)",
		ArgsUsage: " ",
		Description: "A thread of a root process in the guest is made to call kill(PID, SIGKILL) right\n" +
			"after one of its own system calls, through QEMU's gdbstub, and gets its registers\n" +
			"back after; the guest kernel does the rest. Refused: pid 1, kernel threads, and\n" +
			"whatever kvmscope cannot tell is safe. See docs/writable.md.",
		Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag,
			&cli.IntFlag{Name: "pid", Usage: "the guest process to kill", Required: true},
		},
		Action: func(c *cli.Context) error {
			cl, err := client(c)
			if err != nil {
				return err
			}
			cl = cl.WithTimeout(api.ActionTimeout)
			ctx, cancel := context.WithTimeout(context.Background(), api.ActionTimeout)
			defer cancel()
			var a session.GuestAction
			if err := cl.PostJSON(ctx, "/v1/actions/kill", api.KillRequest{PID: c.Int("pid")}, &a); err != nil {
				return cli.Exit(err.Error(), 1)
			}
			if c.Bool("json") {
				if err := printJSON(a); err != nil {
					return err
				}
			} else if a.Return == 0 {
				fmt.Printf("killed pid %d (%s) with SIGKILL: kill(2) by pid %d (%s) on vCPU %d returned 0\n", a.PID, a.Comm, a.ByPID, a.ByComm, a.VCPU)
			}
			if a.Return != 0 {
				// The guest kernel said no (EPERM from an LSM, ESRCH: it
				// exited meanwhile); the registers were put back.
				return cli.Exit(fmt.Sprintf("kill(2) of pid %d by pid %d (%s) returned %s", a.PID, a.ByPID, a.ByComm, errnoText(a.Return)), 1)
			}
			return nil
		},
	}
}

// errnoText is a system call's return value as strace prints it.
func errnoText(ret int64) string {
	if ret < 0 && ret > -4096 {
		return fmt.Sprintf("%d (%v)", ret, syscall.Errno(-ret))
	}
	return fmt.Sprint(ret)
}
