package main

import (
	"context"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/kvmscope/kvmscope/introspect"

	"github.com/urfave/cli/v2"
)

// integrityCommand checks the guest's system-call dispatch (tables, the
// code of x64_sys_call and the entry, the IDT, LSTAR, CR0.WP, SMEP/SMAP).
func integrityCommand() *cli.Command {
	return &cli.Command{
		Name:  "integrity",
		Usage: "check the guest's system-call dispatch against the kernel's own rules and the baseline of the first scan",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag,
			&cli.BoolFlag{Name: "restore", Usage: "write the baseline back over what changed, with the VM paused, and verify (needs run --allow-write)"},
		},
		Action: guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			if c.Bool("restore") {
				lg, ok := g.(*liveGuest)
				if !ok {
					return cli.Exit("--restore works on a running VM, not a dump", 2)
				}
				var restored []introspect.Deviation
				if err := lg.c.Post(ctx, "/v1/integrity/restore", &restored); err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(restored)
				}
				for _, d := range restored {
					fmt.Printf("restored %s: %s -> %s %s\n", d.What, d.Current, orDash(d.Baseline), d.BaselineSymbol)
				}
				if len(restored) == 0 {
					fmt.Println("nothing to restore")
				}
				return nil
			}
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
