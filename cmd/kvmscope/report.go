package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/rules"
	"github.com/urfave/cli/v2"
)

// reportCommand judges the guest by a rule base and prints the findings,
// highest severity first.
func reportCommand() *cli.Command {
	return &cli.Command{
		Name:  "report",
		Usage: "judge the guest by its rule base (processes, modules, hidden objects, dispatch integrity) and list the findings",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag, allFlag, jobsFlag, dirFlag,
			&cli.StringFlag{Name: "rules", Usage: "judge a dump (--core) by this rule file (default: the built-in rules)"},
			&cli.BoolFlag{Name: "cached", Usage: "the newest judgement of the VM's scheduled scans (run --scan-interval), without scanning now"},
		},
		Action: orAll(reportAll, guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			var set *rules.Set
			if path := c.String("rules"); path != "" {
				var err error
				if set, err = loadRules(path); err != nil {
					return err
				}
			}
			rep, err := g.report(ctx, set, c.Bool("cached"))
			if err != nil {
				return err
			}
			// Partial results are results: the warning goes to stderr
			// (and is in the JSON), the exit status stays 0.
			for _, w := range rep.Warnings {
				fmt.Fprintf(os.Stderr, "kvmscope: warning: %s\n", w)
			}
			if c.Bool("json") {
				return printJSON(rep)
			}
			active := 0
			for _, f := range rep.Findings {
				if f.Active {
					active++
				}
			}
			fmt.Printf("rules: %s; judged: %s; %d findings (%d active)\n", rep.Rules, strings.Join(rep.Judged, ", "), len(rep.Findings), active)
			if len(rep.Findings) == 0 {
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SEVERITY\tRULE\tKIND\tFINDING\tFIRST SEEN\tLAST SEEN\tACTIVE")
			for _, f := range rep.Findings {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%v\n", f.Severity, f.Rule, f.Kind, f.Summary,
					f.FirstSeen.Local().Format(time.DateTime), f.LastSeen.Local().Format(time.DateTime), f.Active)
			}
			return tw.Flush()
		})),
	}
}
