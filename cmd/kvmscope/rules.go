package main

import (
	"context"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/api"

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
			{
				Name:  "show",
				Usage: "the rule base a running VM judges by",
				Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag},
				Action: func(c *cli.Context) error {
					return rulesRequest(c, false)
				},
			},
			{
				Name:  "reload",
				Usage: "make a running VM read its rule file again (as SIGHUP to its tracer does); a bad file keeps the rules in force",
				Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag},
				Action: func(c *cli.Context) error {
					return rulesRequest(c, true)
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

// rulesRequest prints the rule base of a running VM, after a reload when
// reload is set.
func rulesRequest(c *cli.Context, reload bool) error {
	cl, err := client(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var info api.RulesInfo
	if reload {
		err = cl.Post(ctx, "/v1/rules/reload", &info)
	} else {
		err = cl.Get(ctx, "/v1/rules", &info)
	}
	if err != nil {
		return cli.Exit(err.Error(), 1)
	}
	if c.Bool("json") {
		return printJSON(info)
	}
	fmt.Printf("%s: %d rules\n", info.Source, len(info.Rules))
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINE\tSEVERITY\tMATCHES\tNAME")
	for _, r := range info.Rules {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", r.Line, r.Severity, r.Matcher, r.Name)
	}
	return tw.Flush()
}
