package main

import (
	"fmt"

	"github.com/kvmscope/kvmscope/rules"
	"github.com/urfave/cli/v2"
)

func rulesCommand() *cli.Command {
	return &cli.Command{
		Name:  "rules",
		Usage: "check rule files: what a scan must not see (docs/rules.md)",
		Subcommands: []*cli.Command{
			{
				Name:      "check",
				Usage:     "check a rule file: a one-line summary and exit 0, or the error's line and exit 2",
				ArgsUsage: "FILE",
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return cli.Exit("rules check needs one FILE", 2)
					}
					s, err := loadRules(c.Args().First())
					if err != nil {
						return err
					}
					fmt.Printf("%s: %d rules ok\n", c.Args().First(), len(s.Rules))
					return nil
				},
			},
		},
	}
}

// loadRules reads a rule file, as loadPolicy reads a policy: a bad file
// is one line naming its line ("FILE:LINE: message"), and exit status 2.
func loadRules(name string) (*rules.Set, error) {
	s, err := rules.Load(name)
	if err != nil {
		return nil, cli.Exit(err.Error(), 2)
	}
	return s, nil
}
