package main

import (
	"strings"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/rules"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

// attachCommand serves the API of a QEMU that is already running, read
// only, through its QMP socket: no ptrace, nothing changed in QEMU
// (docs/attach.md).
func attachCommand() *cli.Command {
	return &cli.Command{
		Name:  "attach",
		Usage: "serve the API of a running QEMU, read-only, through its QMP socket (no restart, no ptrace); Ctrl-C or SIGTERM detaches",
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "pid", Usage: "QEMU's process id", Required: true},
			&cli.StringFlag{Name: "qmp", Usage: "a QMP socket of that QEMU that nothing else is connected to (-qmp unix:PATH,server=on,wait=off)", Required: true},
			&cli.StringFlag{Name: "api", Usage: "the API socket to serve (default: the socket directory's NAME.sock)"},
			&cli.StringFlag{Name: "name", Usage: "the VM's name (default: qemu-PID)"},
			&cli.StringFlag{Name: "rules", Usage: "judge the guest by this rule file (docs/rules.md)"},
			&cli.DurationFlag{Name: "scan-interval", Usage: "scan and judge the guest on this interval; 0 scans only on demand"},
		},
		Action: func(c *cli.Context) error {
			var set *rules.Set
			var err error
			scan := session.DefaultScan
			scan.Interval = c.Duration("scan-interval")
			if path := c.String("rules"); path != "" {
				if set, err = loadRules(path); err != nil {
					return err
				}
				scan.ApplyScanSection(set.Scan, func(key string) bool { return c.IsSet("scan-" + strings.ReplaceAll(key, "_", "-")) })
			}
			if scan.Interval > 0 {
				if err := scan.Check(); err != nil {
					return cli.Exit(err.Error(), 2)
				}
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
