package main

import (
	"errors"
	"strings"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/rules"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:      "run",
		Usage:     "launch QEMU under kvmscope and serve the VM's API",
		ArgsUsage: "-- QEMU_BINARY [QEMU ARGS...]",
		Description: "QEMU runs exactly as it would without kvmscope: same argv, environment,\n" +
			"cwd, stdio and inherited fds; its exit status becomes kvmscope's.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "api", Usage: "API socket path (default: $XDG_RUNTIME_DIR/kvmscope/NAME.sock or /run/kvmscope/NAME.sock, NAME from QEMU's -name, else qemu-PID)"},
			&cli.BoolFlag{Name: "no-api", Usage: "do not serve the API"},
			&cli.BoolFlag{Name: "allow-write", Usage: "allow writes to guest memory through the API"},
			&cli.BoolFlag{Name: "guard", Usage: "once the guest kernel has booted, block guest writes to its system-call dispatch (KVM only; docs/dispatch-guard.md)"},
			&cli.StringFlag{Name: "policy", Usage: "enforce the ioctl policy in this YAML file (docs/policy.md); \"default\" is the shipped one", EnvVars: []string{"KVMSCOPE_POLICY"}},
			&cli.DurationFlag{Name: "watchdog", Value: launch.DefaultWatchdog, Usage: "restart the analysis process (the part that parses guest memory and serves the API) when the API has not answered for this long; 0: only when it dies (docs/how-it-works.md)"},
		}, scanFlags()...),
		Action: runAction,
	}
}

func runAction(c *cli.Context) error {
	args := c.Args().Slice()
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		return cli.Exit("run needs a QEMU command: kvmscope run -- qemu-system-x86_64 ARGS...", 2)
	}
	if err := launch.CheckWatchdog(c.Duration("watchdog")); err != nil {
		return cli.Exit("--watchdog "+err.Error(), 2)
	}
	pol, err := loadPolicy(c.String("policy"))
	if err != nil {
		return err
	}
	set, scan, err := scanPolicy(c)
	if err != nil {
		return err
	}
	return runQEMU(launch.Options{
		Argv:       args,
		Socket:     c.String("api"),
		NoAPI:      c.Bool("no-api"),
		AllowWrite: c.Bool("allow-write"),
		Guard:      c.Bool("guard"),
		Watchdog:   c.Duration("watchdog"),
		Judging:    launch.Judging{Rules: set, RulesPath: c.String("rules"), Scan: scan},
		FailMode:   launch.FailClosed,
		Policy:     pol,
		Log:        log,
	})
}

// runQEMU runs QEMU under the tracer and turns the outcome into an exit.
func runQEMU(o launch.Options) error {
	code, err := launch.Run(o)
	var ee *launch.ExitError
	if errors.As(err, &ee) {
		return cli.Exit(ee.Error(), ee.Code)
	}
	if code != 0 {
		return cli.Exit("", code)
	}
	return nil
}

// scanFlags are the flags of the rule base and the scan policy, for run
// and attach.
func scanFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "rules", Usage: "judge the guest by the rule base in this YAML file (docs/rules.md), reloaded when it changes and on SIGHUP; default: the built-in rules"},
		&cli.DurationFlag{Name: "scan-interval", Usage: "scan the guest's processes on this interval (e.g. 5s), keeping the latest table for the API; 0 scans only on demand"},
		&cli.Float64Flag{Name: "scan-jitter", Value: session.DefaultScan.Jitter, Usage: "spread each wait between scans over interval*(1±J), 0 to below 1"},
		&cli.DurationFlag{Name: "scan-max-cpu", Usage: "stop a scheduled scan that used this much CPU time (reported as partial); 0: no bound"},
		&cli.Int64Flag{Name: "scan-max-bytes", Usage: "stop a scheduled scan that read this much guest memory (reported as partial); 0: no bound"},
		&cli.Float64Flag{Name: "scan-max-duty", Value: session.DefaultScan.MaxDuty, Usage: "the share of one core scheduled scans may take over time (0 to 1; 0: no bound)"},
		&cli.Float64Flag{Name: "scan-busy-load", Usage: "back off (double the wait, up to 16 intervals) while the host's load average per CPU is above this; 0: never"},
		&cli.Float64Flag{Name: "scan-busy-vm", Usage: "back off the same way while the VM's vCPUs ran more than this share of the time (0 to 1); 0: never"},
	}
}

// scanPolicy reads the rule file and the scan policy from scanFlags: a
// flag given on the command line wins over the rule file's scan: section.
func scanPolicy(c *cli.Context) (*rules.Set, session.ScanPolicy, error) {
	scan := session.ScanPolicy{Interval: c.Duration("scan-interval"), Jitter: c.Float64("scan-jitter"), MaxCPU: c.Duration("scan-max-cpu"),
		MaxBytes: c.Int64("scan-max-bytes"), MaxDuty: c.Float64("scan-max-duty"), BusyLoad: c.Float64("scan-busy-load"), BusyVM: c.Float64("scan-busy-vm")}
	var set *rules.Set
	if path := c.String("rules"); path != "" {
		var err error
		if set, err = loadRules(path); err != nil {
			return nil, scan, err
		}
		scan.ApplyScanSection(set.Scan, func(key string) bool { return c.IsSet("scan-" + strings.ReplaceAll(key, "_", "-")) })
	}
	if scan.Interval > 0 {
		if err := scan.Check(); err != nil {
			return nil, scan, cli.Exit(err.Error(), 2)
		}
	}
	return set, scan, nil
}
