package main

import (
	"context"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/urfave/cli/v2"
)

// integrityCommand checks the guest's system-call dispatch (tables, the
// code of x64_sys_call and the entry, the IDT, LSTAR, CR0.WP, SMEP/SMAP).
func integrityCommand() *cli.Command {
	return &cli.Command{
		Name:  "integrity",
		Usage: "check the guest's system-call dispatch against the kernel's own rules and the baseline of the first scan",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag},
		Action: guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			in, err := g.integrity(ctx)
			if err != nil {
				return err
			}
			for _, n := range in.Notes {
				fmt.Fprintf(os.Stderr, "kvmscope: %s\n", n)
			}
			if c.Bool("json") {
				// An array of deviations: a clean kernel prints [].
				return printJSON(in.Deviations)
			}
			if len(in.Deviations) == 0 {
				fmt.Printf("no deviations (baseline: %s)\n", in.Baseline)
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "WHAT\tKIND\tCURRENT\tSYMBOL\tBASELINE\tSYMBOL")
			for _, d := range in.Deviations {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.What, d.Kind, d.Current, orDash(d.CurrentSymbol), orDash(d.Baseline), orDash(d.BaselineSymbol))
			}
			return tw.Flush()
		}),
	}
}
