package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

func dumpCommand() *cli.Command {
	return &cli.Command{
		Name:  "dump",
		Usage: "write the VM's memory and vCPU state as an ELF core (like QEMU's dump-guest-memory)",
		Flags: []cli.Flag{apiFlag, vmFlag,
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "core file to write", Required: true},
			&cli.BoolFlag{Name: "force", Usage: "replace an existing file"},
		},
		Action: func(c *cli.Context) error {
			out := c.String("output")
			if _, err := os.Lstat(out); err == nil && !c.Bool("force") {
				return cli.Exit(fmt.Sprintf("%s exists; use --force to replace it", out), 1)
			}
			cl, err := client(c)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
			defer cancel()
			mem, err := api.NewRemoteMemory(ctx, cl)
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			var vcpus []api.VCPU
			if err := cl.Get(ctx, "/v1/vcpus", &vcpus); err != nil {
				return cli.Exit(err.Error(), 1)
			}
			cpus := make([]guestmem.CPU, len(vcpus))
			for i, v := range vcpus {
				cpus[i] = cpuFromAPI(v)
			}
			// Write next to the target and rename at the end: a failed or
			// interrupted dump leaves nothing half-written under its name.
			tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".part-*")
			if err != nil {
				return cli.Exit(fmt.Sprintf("create %s: %v", out, err), 1)
			}
			defer os.Remove(tmp.Name())
			progress := func(done, total uint64) {}
			if term.IsTerminal(int(os.Stderr.Fd())) {
				last := time.Time{}
				progress = func(done, total uint64) {
					if time.Since(last) > 100*time.Millisecond || done == total {
						fmt.Fprintf(os.Stderr, "\rdump: %d/%d MiB (%d%%)", done>>20, total>>20, done*100/max(total, 1))
						last = time.Now()
					}
				}
			}
			err = guestmem.WriteCore(tmp, mem, cpus, progress)
			if term.IsTerminal(int(os.Stderr.Fd())) {
				fmt.Fprintln(os.Stderr)
			}
			if err == nil {
				err = tmp.Sync()
			}
			if cerr := tmp.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return cli.Exit(fmt.Sprintf("dump: %v", err), 1)
			}
			if err := os.Rename(tmp.Name(), out); err != nil {
				return cli.Exit(fmt.Sprintf("dump: %v", err), 1)
			}
			os.Chmod(out, 0o600)
			return nil
		},
	}
}

func cpuFromAPI(v api.VCPU) guestmem.CPU {
	c := guestmem.CPU{ID: v.ID, RIP: uint64(v.RIP), RSP: uint64(v.RSP), RFLAGS: uint64(v.RFLAGS),
		CR0: uint64(v.CR0), CR2: uint64(v.CR2), CR3: uint64(v.CR3), CR4: uint64(v.CR4), EFER: uint64(v.EFER),
		CSBase: uint64(v.CSBase), DSBase: uint64(v.DSBase), SSBase: uint64(v.SSBase), FSBase: uint64(v.FSBase), GSBase: uint64(v.GSBase)}
	// The API gives the mode, not the CS bits it came from.
	c.CSL = v.Mode == "long"
	return c
}
