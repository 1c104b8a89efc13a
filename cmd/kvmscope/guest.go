package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/rules"
	"github.com/kvmscope/kvmscope/session"
	"github.com/urfave/cli/v2"
)

// The guest-kernel commands read either a live VM (--api/--vm) or an ELF
// core (--core). A live VM is introspected inside `kvmscope run`, which
// keeps what it discovered; a core is introspected here.

var coreFlag = &cli.StringFlag{Name: "core", Usage: "read an ELF core (QEMU dump-guest-memory or kvmscope dump) instead of a live VM"}

// guest is where the guest kernel's objects come from.
type guest interface {
	kernel(ctx context.Context) (api.Kernel, error)
	// processes lists the processes, and the warnings of a partial
	// list (a damaged tasks list: what was read before the break).
	processes(ctx context.Context, threads, consistent bool) ([]api.Process, []string, error)
	// processesJSON writes the processes to w as `--json` prints them.
	processesJSON(ctx context.Context, threads, consistent bool, w io.Writer) ([]string, error)
	modules(ctx context.Context) ([]api.Module, error)
	integrity(ctx context.Context) (*session.Integrity, error)
	// report judges the guest by its rule base: a live VM's own (cached:
	// the newest judgement of its scheduled scans), or set for a dump.
	report(ctx context.Context, set *rules.Set, cached bool) (*session.Report, error)
	offsets(ctx context.Context, format, name string) ([]byte, error)
	close()
}

func openGuest(c *cli.Context) (guest, error) {
	if path := c.String("core"); path != "" {
		if c.String("api") != "" || c.String("vm") != "" {
			return nil, cli.Exit("give either --core or --api/--vm, not both", 2)
		}
		core, err := guestmem.OpenCore(path)
		if err != nil {
			return nil, cli.Exit(fmt.Sprintf("open core: %v", err), 1)
		}
		return &coreGuest{core: core, sess: session.New(session.Frozen{Src: core}, nil)}, nil
	}
	cl, err := client(c)
	if err != nil {
		return nil, err
	}
	return &liveGuest{c: cl}, nil
}

type liveGuest struct{ c *api.Client }

func (g *liveGuest) kernel(ctx context.Context) (api.Kernel, error) {
	var k api.Kernel
	return k, g.c.Get(ctx, "/v1/kernel", &k)
}

func processesPath(threads, consistent bool) string {
	q := url.Values{}
	if threads {
		q.Set("threads", "1")
	}
	if consistent {
		q.Set("consistent", "1")
	}
	return "/v1/processes?" + q.Encode()
}

func (g *liveGuest) processes(ctx context.Context, threads, consistent bool) ([]api.Process, []string, error) {
	var ps []api.Process
	ws, err := getWarned(ctx, g.c, processesPath(threads, consistent), &ps)
	return ps, ws, err
}

// getWarned is Client.Get that also returns the warnings of a partial
// reply (api.HeaderWarning).
func getWarned(ctx context.Context, c *api.Client, path string, v any) ([]string, error) {
	resp, err := c.Response(ctx, path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return resp.Header.Values(api.HeaderWarning), nil
}

// processesJSON passes the server's reply on to w as it comes: one
// process a line (api's writeProcesses), nothing decoded and encoded again.
func (g *liveGuest) processesJSON(ctx context.Context, threads, consistent bool, w io.Writer) ([]string, error) {
	resp, err := g.c.Response(ctx, processesPath(threads, consistent))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(w, resp.Body); err != nil {
		return nil, fmt.Errorf("read the process list: %w", err)
	}
	return resp.Header.Values(api.HeaderWarning), nil
}

func (g *liveGuest) modules(ctx context.Context) ([]api.Module, error) {
	var ms []api.Module
	ws, err := getWarned(ctx, g.c, "/v1/modules", &ms)
	warnPartial("module list", ws)
	return ms, err
}

// warnPartial says on stderr that a list is partial, and why: partial
// results are results (exit status 0).
func warnPartial(what string, ws []string) {
	for _, w := range ws {
		fmt.Fprintf(os.Stderr, "kvmscope: warning: partial %s: %s\n", what, w)
	}
}

func (g *liveGuest) integrity(ctx context.Context) (*session.Integrity, error) {
	var in session.Integrity
	return &in, g.c.Get(ctx, "/v1/integrity", &in)
}

func (g *liveGuest) report(ctx context.Context, set *rules.Set, cached bool) (*session.Report, error) {
	if set != nil {
		return nil, cli.Exit("a running VM is judged by its own rule base (kvmscope run --rules FILE); --rules is for --core", 2)
	}
	path := "/v1/report"
	if cached {
		path += "?cached=1"
	}
	var r session.Report
	return &r, g.c.Get(ctx, path, &r)
}

func (g *liveGuest) offsets(ctx context.Context, format, name string) ([]byte, error) {
	q := url.Values{"format": {format}, "name": {name}}
	return g.c.GetRaw(ctx, "/v1/offsets?"+q.Encode())
}

func (g *liveGuest) close() {}

// coreGuest reads an ELF core through the same session code as the
// server, on a Machine that never changes.
type coreGuest struct {
	core *guestmem.Core
	sess *session.Session
}

func (g *coreGuest) kernel(ctx context.Context) (api.Kernel, error) {
	k, off, offErr, err := g.sess.Kernel(ctx)
	if err != nil {
		return api.Kernel{}, err
	}
	return api.KernelFrom(k, off, offErr), nil
}

func (g *coreGuest) processes(ctx context.Context, threads, _ bool) ([]api.Process, []string, error) {
	// A core is consistent by nature.
	scan, err := g.sess.Processes(ctx, introspect.ProcessOptions{Threads: threads}, false)
	if err != nil {
		return nil, nil, err
	}
	return api.ProcessesFrom(scan.Processes), scan.Warnings, nil
}

func (g *coreGuest) processesJSON(ctx context.Context, threads, _ bool, w io.Writer) ([]string, error) {
	scan, err := g.sess.Processes(ctx, introspect.ProcessOptions{Threads: threads}, false)
	if err != nil {
		return nil, err
	}
	return scan.Warnings, api.WriteProcesses(w, scan.Processes)
}

func (g *coreGuest) modules(ctx context.Context) ([]api.Module, error) {
	ms, err := g.sess.Modules(ctx)
	var damage *introspect.PartialError
	if errors.As(err, &damage) {
		warnPartial("module list", damage.Warnings)
	} else if err != nil {
		return nil, err
	}
	return api.ModulesFrom(ms), nil
}

// integrity of a dump: no baseline, the kernel's own rules only.
func (g *coreGuest) integrity(ctx context.Context) (*session.Integrity, error) {
	return g.sess.Integrity(ctx, "")
}

func (g *coreGuest) report(ctx context.Context, set *rules.Set, _ bool) (*session.Report, error) {
	if set != nil {
		g.sess.SetRules(set)
	}
	return g.sess.Judge(ctx)
}

func (g *coreGuest) offsets(ctx context.Context, format, name string) ([]byte, error) {
	k, off, _, err := g.sess.Kernel(ctx)
	if err != nil {
		return nil, err
	}
	b, _, err := api.FormatOffsets(k, off, format, name)
	return b, err
}

func (g *coreGuest) close() { g.core.Close() }

// guestAction wraps a command body with opening the guest and turning
// errors into one line.
func guestAction(body func(c *cli.Context, g guest, ctx context.Context) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		g, err := openGuest(c)
		if err != nil {
			return err
		}
		defer g.close()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := body(c, g, ctx); err != nil {
			if _, ok := err.(cli.ExitCoder); ok {
				return err
			}
			return cli.Exit(err.Error(), 1)
		}
		return nil
	}
}

func psCommand() *cli.Command {
	return &cli.Command{
		Name:  "ps",
		Usage: "list the guest's processes, read from its kernel's memory",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag, allFlag, jobsFlag, dirFlag,
			&cli.BoolFlag{Name: "threads", Usage: "list every thread, not one line per process"},
			&cli.BoolFlag{Name: "tree", Usage: "show the process tree"},
			&cli.BoolFlag{Name: "consistent", Usage: "pause the VM during the scan (live VMs)"},
		},
		Action: orAll(psAll, guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			// A partial list (a damaged tasks list) is printed, with
			// the warning on stderr and exit status 0.
			warn := func(ws []string) { warnPartial("process list", ws) }
			if c.Bool("json") {
				ws, err := g.processesJSON(ctx, c.Bool("threads"), c.Bool("consistent"), os.Stdout)
				warn(ws)
				return err
			}
			ps, ws, err := g.processes(ctx, c.Bool("threads"), c.Bool("consistent"))
			if err != nil {
				return err
			}
			defer warn(ws)
			if c.Bool("tree") {
				printTree(ps)
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			if c.Bool("threads") {
				fmt.Fprintln(tw, "PID\tTGID\tPPID\tUID\tGID\tSTAT\tCOMM\tCMDLINE")
			} else {
				fmt.Fprintln(tw, "PID\tPPID\tUID\tGID\tSTAT\tTHR\tCOMM\tCMDLINE")
			}
			for _, p := range ps {
				cmd := printable(strings.Join(p.Cmdline, " "), 200)
				if p.KThread {
					cmd = "[" + p.Comm + "]"
				}
				if c.Bool("threads") {
					fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", p.PID, p.TGID, p.PPID, p.UID, p.GID, p.State, printable(p.Comm, 16), cmd)
				} else {
					fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%s\t%d\t%s\t%s\n", p.PID, p.PPID, p.UID, p.GID, p.State, p.Threads, printable(p.Comm, 16), cmd)
				}
			}
			return tw.Flush()
		})),
	}
}

// printable makes a command line safe for one table cell, as ps does:
// control characters become '?', and it is cut at max runes.
func printable(s string, max int) string {
	var b strings.Builder
	n := 0
	for _, r := range s {
		if n == max {
			b.WriteString("…")
			break
		}
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			r = '?'
		}
		b.WriteRune(r)
		n++
	}
	return b.String()
}

// printTree prints processes as a tree by parent, like `ps -H` / pstree.
func printTree(ps []api.Process) {
	children := map[int][]api.Process{}
	known := map[int]bool{}
	for _, p := range ps {
		known[p.TGID] = true
	}
	var roots []api.Process
	for _, p := range ps {
		if p.PPID == p.TGID || !known[p.PPID] {
			roots = append(roots, p)
			continue
		}
		children[p.PPID] = append(children[p.PPID], p)
	}
	seen := map[int]bool{}
	var walk func(p api.Process, prefix string, last bool, depth int)
	walk = func(p api.Process, prefix string, last bool, depth int) {
		if seen[p.TGID] || depth > 256 {
			return
		}
		seen[p.TGID] = true
		branch, next := "├─ ", "│  "
		if last {
			branch, next = "└─ ", "   "
		}
		if depth == 0 {
			branch, next = "", ""
		}
		fmt.Printf("%s%s%s(%d) uid=%d\n", prefix, branch, printable(p.Comm, 16), p.PID, p.UID)
		kids := children[p.TGID]
		sort.Slice(kids, func(i, j int) bool { return kids[i].PID < kids[j].PID })
		for i, k := range kids {
			walk(k, prefix+next, i == len(kids)-1, depth+1)
		}
	}
	for _, r := range roots {
		walk(r, "", true, 0)
	}
}

func lsmodCommand() *cli.Command {
	return &cli.Command{
		Name:  "lsmod",
		Usage: "list the guest kernel's loaded modules",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag, allFlag, jobsFlag, dirFlag},
		Action: orAll(lsmodAll, guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			ms, err := g.modules(ctx)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(ms)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MODULE\tSIZE\tBASE\tSTATE")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%d\t%#x\t%s\n", m.Name, m.Size, uint64(m.Base), m.State)
			}
			if len(ms) == 0 {
				fmt.Fprintln(os.Stderr, "(no modules loaded)")
			}
			return tw.Flush()
		})),
	}
}

func kernelCommand() *cli.Command {
	return &cli.Command{
		Name:  "kernel",
		Usage: "describe the guest kernel: version, KASLR, page tables, where each offset came from",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag},
		Action: guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			k, err := g.kernel(ctx)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(k)
			}
			fmt.Printf("banner:            %s\n", k.Banner)
			fmt.Printf("version:           %s\n", k.Version)
			fmt.Printf("_text:             %#x (physical %#x)\n", uint64(k.TextVA), uint64(k.PhysBase))
			fmt.Printf("KASLR shift:       %#x\n", uint64(k.KASLRShift))
			fmt.Printf("kernel page table: %#x (%d levels)\n", uint64(k.PGD), k.PagingLevels)
			fmt.Printf("page_offset_base:  %#x\nvmemmap_base:      %#x\nvmalloc_base:      %#x\n", uint64(k.PageOffsetBase), uint64(k.VmemmapBase), uint64(k.VmallocBase))
			fmt.Printf("BTF:               %v\nkallsyms symbols:  %d\n\n", k.BTF, k.Symbols)
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MEMBER\tOFFSET\tSOURCE\tHOW")
			for _, m := range k.Offsets {
				if !m.Known() {
					fmt.Fprintf(tw, "%s\t-\tunknown\t\n", m.Name)
					continue
				}
				fmt.Fprintf(tw, "%s\t%#x\t%s\t%s\n", m.Name, m.Value, m.Source, m.How)
			}
			tw.Flush()
			if k.Unsolved != "" {
				fmt.Printf("\nnot found: %s\n", k.Unsolved)
			}
			return nil
		}),
	}
}

func offsetsCommand() *cli.Command {
	return &cli.Command{
		Name:  "offsets",
		Usage: "print the structure offsets for other tools (LibVMI config, Volatility 3 ISF)",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag,
			&cli.StringFlag{Name: "format", Value: "json", Usage: "json, libvmi or isf"},
			&cli.StringFlag{Name: "name", Usage: "domain name for the LibVMI config entry"},
		},
		Action: guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			switch c.String("format") {
			case "json", "libvmi", "isf":
			default:
				return cli.Exit(fmt.Sprintf("bad --format %q: want json, libvmi or isf", c.String("format")), 2)
			}
			b, err := g.offsets(ctx, c.String("format"), c.String("name"))
			if err != nil {
				return err
			}
			if c.String("format") != "libvmi" && json.Valid(b) {
				os.Stdout.Write(b)
				if len(b) > 0 && b[len(b)-1] != '\n' {
					fmt.Println()
				}
				return nil
			}
			_, err = os.Stdout.Write(b)
			return err
		}),
	}
}
