package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

// guardCommand shows and changes what the dispatch guard protects.
func guardCommand() *cli.Command {
	return &cli.Command{
		Name:  "guard",
		Usage: "show what the guard protects from guest writes; --dispatch, --gpa or --off change it",
		Description: "The guard makes guest pages read-only for the guest, from the host (KVM only):\n" +
			"a guest store into them is skipped and logged (kvmscope blocked). Changing it\n" +
			"needs a VM started with --guard or --allow-write. See docs/dispatch-guard.md.",
		Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag,
			&cli.BoolFlag{Name: "dispatch", Usage: "protect the guest kernel's system-call tables and dispatch functions"},
			&cli.StringSliceFlag{Name: "gpa", Usage: "protect guest-physical ADDR[+LEN] (whole pages; LEN defaults to one page); repeatable"},
			&cli.BoolFlag{Name: "off", Usage: "protect nothing"},
		},
		Action: func(c *cli.Context) error {
			req, change, err := guardRequest(c)
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			cl, err := client(c)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			var g session.Guard
			if change {
				err = cl.PostJSON(ctx, "/v1/integrity/guard", req, &g)
			} else {
				err = cl.Get(ctx, "/v1/integrity/guard", &g)
			}
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			if c.Bool("json") {
				return printJSON(g)
			}
			printGuard(g)
			return nil
		},
	}
}

// guardRequest builds the change the flags ask for (change false: none).
func guardRequest(c *cli.Context) (req api.GuardRequest, change bool, err error) {
	for _, s := range c.StringSlice("gpa") {
		addr, size, _ := strings.Cut(s, "+")
		gpa, err := strconv.ParseUint(addr, 0, 64)
		if err != nil {
			return req, false, fmt.Errorf("--gpa %q: want ADDR[+LEN], e.g. 0x200000+0x1000", s)
		}
		n := uint64(4096)
		if size != "" {
			if n, err = strconv.ParseUint(size, 0, 64); err != nil || n == 0 {
				return req, false, fmt.Errorf("--gpa %q: LEN must be a positive number", s)
			}
		}
		req.Ranges = append(req.Ranges, api.GuardRange{GPA: api.Hex64(gpa), Size: api.Hex64(n)})
	}
	req.Dispatch, req.Off = c.Bool("dispatch"), c.Bool("off")
	n := 0
	for _, b := range []bool{req.Dispatch, len(req.Ranges) > 0, req.Off} {
		if b {
			n++
		}
	}
	if n > 1 {
		return req, false, fmt.Errorf("give one of --dispatch, --gpa and --off")
	}
	return req, n == 1, nil
}

func printGuard(g session.Guard) {
	w := tabwriter.NewWriter(os.Stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintf(w, "blocked writes:\t%d\n", g.Blocked)
	if len(g.Protected) == 0 {
		fmt.Fprintln(w, "protected:\tnothing")
	}
	for _, r := range g.Protected {
		fmt.Fprintf(w, "protected:\t%#x-%#x\t(%d pages)\n", r.GPA, r.End(), r.Size/4096)
	}
	for _, t := range g.Targets {
		fmt.Fprintf(w, "target:\t%s\tat %s, %d bytes\n", t.What, t.VA, t.Size)
	}
	for _, u := range g.Unprotected {
		fmt.Fprintf(w, "not protected:\t%#x-%#x\t%s\n", u.GPA, u.End(), u.Reason)
	}
	w.Flush()
}

// blockedCommand prints the blocked-write log.
func blockedCommand() *cli.Command {
	return &cli.Command{
		Name:  "blocked",
		Usage: "print the guest writes the guard blocked; --follow waits for new ones",
		Flags: []cli.Flag{apiFlag, vmFlag, jsonFlag,
			&cli.Uint64Flag{Name: "since", Usage: "only entries after this sequence number"},
			&cli.BoolFlag{Name: "follow", Aliases: []string{"f"}, Usage: "keep printing new entries until interrupted"},
		},
		Action: func(c *cli.Context) error {
			return followLog(c, "/v1/integrity/blocked", "blocked writes", blockedLine)
		},
	}
}

// blockedLine is one blocked write for a terminal.
func blockedLine(raw json.RawMessage) string {
	var e struct {
		Seq uint64 `json:"seq"`
		session.BlockedWrite
	}
	if json.NewDecoder(bytes.NewReader(raw)).Decode(&e) != nil {
		return string(raw)
	}
	who := "qemu tid " + strconv.Itoa(e.TID)
	if e.VCPU != nil {
		who = "vcpu " + strconv.Itoa(*e.VCPU)
	}
	where := e.GPA
	if e.GVA != "" {
		where += " (" + e.GVA + ")"
	}
	if e.Target != "" {
		where += " " + e.Target
	}
	rip := e.RIP
	if e.RIPSymbol != "" {
		rip += " " + e.RIPSymbol
	}
	s := fmt.Sprintf("%d\t%s\t%s\t%s\tbytes %s\trip %s", e.Seq, e.At.Format(time.RFC3339Nano), who, where, e.Bytes, rip)
	if e.Landed {
		s += "\tLANDED: " + e.Reason
	}
	if e.Note != "" {
		s += "\t(" + e.Note + ")"
	}
	return s
}
