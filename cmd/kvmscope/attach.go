package main

import (
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/urfave/cli/v2"
)

// attachCommand serves the API of a QEMU that is already running, read
// only, through its QMP socket: no ptrace, nothing changed in QEMU
// (docs/attach.md).
func attachCommand() *cli.Command {
	return &cli.Command{
		Name:  "attach",
		Usage: "serve the API of a running QEMU, read-only, through its QMP socket (no restart, no ptrace); Ctrl-C or SIGTERM detaches",
		Flags: append([]cli.Flag{
			&cli.IntFlag{Name: "pid", Usage: "QEMU's process id", Required: true},
			&cli.StringFlag{Name: "qmp", Usage: "a QMP socket of that QEMU that nothing else is connected to (-qmp unix:PATH,server=on,wait=off)", Required: true},
			&cli.StringFlag{Name: "api", Usage: "the API socket to serve (default: the socket directory's NAME.sock)"},
			&cli.StringFlag{Name: "name", Usage: "the VM's name (default: qemu-PID)"},
		}, scanFlags()...),
		Action: func(c *cli.Context) error {
			set, scan, err := scanPolicy(c)
			if err != nil {
				return err
			}
			err = launch.Attach(launch.AttachOptions{
				PID: c.Int("pid"), QMP: c.String("qmp"), Socket: c.String("api"), Name: c.String("name"),
				Rules: set, RulesPath: c.String("rules"), ScanInterval: scan.Interval, Scan: scan, Log: log,
			})
			if err != nil {
				return cli.Exit("kvmscope attach: "+err.Error(), 1)
			}
			return nil
		},
	}
}
