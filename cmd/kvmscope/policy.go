package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"github.com/urfave/cli/v2"
)

func policyCommand() *cli.Command {
	return &cli.Command{
		Name:  "policy",
		Usage: "check, show or learn ioctl policies (docs/policy.md)",
		Subcommands: []*cli.Command{
			{
				Name:      "check",
				Usage:     "check a policy file: a one-line summary and exit 0, or the error's line and column and exit 2",
				ArgsUsage: "FILE",
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return cli.Exit("policy check needs one FILE", 2)
					}
					p, err := loadPolicy(c.Args().First())
					if err != nil {
						return err
					}
					fmt.Printf("%s: ok: %s\n", c.Args().First(), p.Summary())
					return nil
				},
			},
			{
				Name:  "default",
				Usage: "print the shipped default policy (what --policy default enforces)",
				Action: func(c *cli.Context) error {
					_, err := os.Stdout.Write(policy.BuiltinText())
					return err
				},
			},
			{
				Name:      "learn",
				Usage:     "run QEMU with every ioctl logged, none refused, and write a policy that allows exactly what it made",
				ArgsUsage: "-o FILE -- QEMU_BINARY [QEMU ARGS...]",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Required: true, Usage: "write the learned policy here (replaced only by a complete, checked file)"},
					&cli.StringFlag{Name: "api", Usage: "API socket path, as for run"},
				},
				Action: func(c *cli.Context) error {
					args := c.Args().Slice()
					if len(args) > 0 && args[0] == "--" {
						args = args[1:]
					}
					if len(args) == 0 {
						return cli.Exit("policy learn needs a QEMU command: kvmscope policy learn -o FILE -- qemu-system-x86_64 ARGS...", 2)
					}
					out, err := filepath.Abs(c.String("output"))
					if err != nil {
						return cli.Exit(err.Error(), 2)
					}
					if st, err := os.Stat(filepath.Dir(out)); err != nil || !st.IsDir() {
						return cli.Exit(fmt.Sprintf("policy learn: %s: no such directory", filepath.Dir(out)), 2)
					}
					return runQEMU(launch.Options{
						Argv:     args,
						Socket:   c.String("api"),
						FailMode: launch.FailClosed,
						LearnTo:  out,
						Log:      log,
					})
				},
			},
		},
	}
}

// loadPolicy reads --policy: "" is none, "default" the shipped policy.
// A bad file is one line naming its line and column, and exit status 2.
func loadPolicy(name string) (*policy.Policy, error) {
	p, err := policy.Named(name)
	var pe *policy.Error
	switch {
	case errors.As(err, &pe):
		return nil, cli.Exit(pe.Error(), 2)
	case err != nil:
		return nil, cli.Exit(fmt.Sprintf("policy: %v", err), 2)
	}
	return p, nil
}
