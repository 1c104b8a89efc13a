package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

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
			&cli.BoolFlag{Name: "live", Usage: "do not pause the VM while dumping (faster for the guest, but the kernel's lists may be torn)"},
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
			ctx, cancel := context.WithTimeout(context.Background(), 6*time.Hour)
			defer cancel()
			// The server pauses the VM for the dump (unless --live) and
			// resumes it whatever happens to us.
			path := "/v1/dump"
			if c.Bool("live") {
				path += "?pause=0"
			}
			body, size, err := cl.Open(ctx, path)
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			defer body.Close()
			// Write next to the target and rename at the end: a failed or
			// interrupted dump leaves nothing half-written under its name.
			tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".part-*")
			if err != nil {
				return cli.Exit(fmt.Sprintf("create %s: %v", out, err), 1)
			}
			defer os.Remove(tmp.Name())
			var src io.Reader = body
			tty := term.IsTerminal(int(os.Stderr.Fd()))
			if tty {
				src = &progressReader{r: body, total: size}
			}
			n, err := io.Copy(tmp, src)
			if tty {
				fmt.Fprintln(os.Stderr)
			}
			if err == nil && size >= 0 && n != size {
				err = fmt.Errorf("the dump ended after %d of %d bytes", n, size)
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

// progressReader prints how much of the dump has arrived.
type progressReader struct {
	r     io.Reader
	total int64
	done  int64
	last  time.Time
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.done += int64(n)
	if time.Since(p.last) > 100*time.Millisecond || err != nil {
		if p.total > 0 {
			fmt.Fprintf(os.Stderr, "\rdump: %d/%d MiB (%d%%)", p.done>>20, p.total>>20, p.done*100/p.total)
		} else {
			fmt.Fprintf(os.Stderr, "\rdump: %d MiB", p.done>>20)
		}
		p.last = time.Now()
	}
	return n, err
}
