// Command kvmscope sees inside KVM/QEMU virtual machines from the host.
//
// `kvmscope run -- qemu-system-x86_64 ARGS...` launches QEMU under kvmscope's
// tracer and serves a local API; the other commands read that API (or a
// memory dump) and print what they find.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/urfave/cli/v2"
)

func init() {
	// The in-place launch (launch.Run) executes QEMU from the main
	// goroutine, which must be on the main thread, the thread-group leader
	// the tracer seizes; locking in init pins it there before main starts.
	runtime.LockOSThread()
}

func main() {
	// Stay on the main thread: kvmscope run ends by executing QEMU from
	// this goroutine, and the tracer has seized this thread (the
	// thread-group leader) only.
	app := newApp()
	if err := app.Run(os.Args); err != nil {
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			if msg := ec.Error(); msg != "" {
				fmt.Fprintf(os.Stderr, "kvmscope: %s\n", msg)
			}
			os.Exit(ec.ExitCode())
		}
		fmt.Fprintf(os.Stderr, "kvmscope: %v\n", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:                 "kvmscope",
		Usage:                "see inside KVM/QEMU virtual machines from the host",
		HideHelpCommand:      true,
		EnableBashCompletion: false,
		// Errors are printed once, by main, as one line.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return cli.Exit(fmt.Sprintf("%v (see 'kvmscope %s --help')", err, c.Command.Name), 2)
		},
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: []string{"KVMSCOPE_LOG_LEVEL"}},
			&cli.StringFlag{Name: "log-format", Value: "auto", Usage: "auto (text on a terminal, else JSON lines), text or json"},
		},
		Before: setupLogging,
		Commands: []*cli.Command{
			runCommand(),
			policyCommand(),
			rulesCommand(),
			eventsCommand(),
			guardCommand(),
			killCommand(),
			catCommand(),
			blockedCommand(),
			vmCommand(),
			vcpusCommand(),
			memCommand(),
			regsCommand(),
			psCommand(),
			lsmodCommand(),
			integrityCommand(),
			reportCommand(),
			attachCommand(),
			detachCommand(),
			kernelCommand(),
			offsetsCommand(),
			dumpCommand(),
			listCommand(),
			exporterCommand(),
		},
	}
}
