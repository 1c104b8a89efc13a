package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/session"
)

// The scan benchmarks of issue 3 (scripts/bench.sh prints them as a
// table): `ps` latency server side on a 100-process and a 5,000-process
// guest, and the time from first contact to the first process list.
//
// The guests are Debian 6.1 under TCG (KVM cannot run Linux on these
// hosts) booted under `kvmscope run`. The TCG memory source reads guest
// RAM from QEMU's address space with process_vm_readv, as the KVM source
// does, so a scan costs about what it would on KVM; only the vCPUs are
// slow. /init starts kvmscope.procs=N extra `sleep` processes.

// scanGuest is a Debian guest under `kvmscope run`, with the API socket and
// an in-process TCG source on the guest's spare QMP socket.
type scanGuest struct {
	g    *testlinux.Guest
	sock string
	api  *api.Client
	qmp  *guestmem.QMP
	qemu int // QEMU's pid (a child of kvmscope run)
}

// bootScanGuest boots Debian with extra sleep processes and memMB of RAM
// under `kvmscope run` (scans on demand only, so nothing has discovered
// the kernel before the caller's first request).
func bootScanGuest(b *testing.B, extra, memMB int, memfd bool) *scanGuest {
	b.Helper()
	return bootScanGuestOn(b, "tcg", extra, memMB, memfd)
}

// bootScanGuestOn is bootScanGuest with QEMU's accelerator accel.
func bootScanGuestOn(b *testing.B, accel string, extra, memMB int, memfd bool) *scanGuest {
	b.Helper()
	return bootScanGuestWith(b, scanBoot{accel: accel, extra: extra, memMB: memMB, memfd: memfd})
}

// scanBoot is how bootScanGuestWith boots: accel, extra sleep processes,
// RAM, memfd RAM, more `kvmscope run` flags, and /init's busy loop
// (kvmscope.spin=1).
type scanBoot struct {
	accel        string
	extra, memMB int
	memfd, spin  bool
	churn        bool // kvmscope.churn=1: a new process every second
	run          []string
}

func bootScanGuestWith(b *testing.B, o scanBoot) *scanGuest {
	b.Helper()
	accel, extra, memMB, memfd := o.accel, o.extra, o.memMB, o.memfd
	p := testlinux.Require(b)
	sock := filepath.Join(b.TempDir(), "api.sock")
	wrapper := append([]string{kvmscopeBin, "--log-level", "warn", "run", "--api", sock}, o.run...)
	opts := testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   accel,
		MemMB:   memMB,
		Wrapper: append(wrapper, "--"),
		// 5,000 forks and /init's /proc walks are slow under TCG.
		Timeout: 3*time.Minute + time.Duration(extra)*60*time.Millisecond,
	}
	var app []string
	if extra > 0 {
		app = append(app, "kvmscope.procs="+strconv.Itoa(extra))
	}
	if o.spin {
		app = append(app, "kvmscope.spin=1")
	}
	if o.churn {
		app = append(app, "kvmscope.churn=1")
	}
	opts.Append = strings.Join(app, " ")
	if memfd {
		// Guest RAM in a memfd, which kvmscope maps read-only and reads
		// without a system call (libvirt: <memoryBacking><source
		// type='memfd'/>); QEMU's default is anonymous memory, read with
		// process_vm_readv.
		opts.ExtraArgs = []string{"-object", fmt.Sprintf("memory-backend-memfd,id=guestram,size=%dM", memMB), "-machine", "memory-backend=guestram"}
	}
	g, err := testlinux.Boot(context.Background(), opts)
	if err != nil {
		b.Fatalf("boot Debian (%d MiB, kvmscope.procs=%d) under kvmscope run: %v", memMB, extra, err)
	}
	b.Cleanup(func() { g.Close() })
	b.Logf("booted Debian %s, %d MiB, %d processes in /proc, in %v", g.Release(), memMB, len(g.PS()), g.BootTime())
	sleeps := 0
	for _, pr := range g.PS() {
		if pr.Comm == "sleep" {
			sleeps++
		}
	}
	if sleeps < 40+extra {
		b.Fatalf("guest lists %d sleep processes; /init should have started %d", sleeps, 40+extra)
	}
	sg := &scanGuest{g: g, sock: sock, api: api.NewClient(sock)}
	if sg.qemu, err = qemuPID(g.Pid()); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if sg.qmp, err = guestmem.DialQMP(ctx, g.SpareQMP()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { sg.qmp.Close() })
	return sg
}

// qemuPID is QEMU's pid for a `kvmscope run` started as pid: pid itself
// (kvmscope run execs QEMU in place and traces it from a forked tracer) or,
// for a launch that keeps kvmscope as the parent, its one child.
func qemuPID(pid int) (int, error) {
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && strings.HasPrefix(filepath.Base(exe), "qemu-system") {
		return pid, nil
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var kids []int
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, s := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(s); err == nil {
				kids = append(kids, n)
			}
		}
	}
	if len(kids) != 1 {
		return 0, fmt.Errorf("kvmscope run (pid %d) is not QEMU and has children %v; want exactly QEMU", pid, kids)
	}
	return kids[0], nil
}

// source is a fresh TCG source of the guest (its memory map is fetched
// from QMP on first use), counting its reads.
func (sg *scanGuest) source() *countingSource {
	return &countingSource{TCG: guestmem.NewTCG(sg.qmp, func() int { return sg.qemu }, false)}
}

// countingSource counts reads of guest physical memory: each is one
// process_vm_readv, whose count does not depend on the machine's load.
type countingSource struct {
	*guestmem.TCG
	reads atomic.Int64
}

func (c *countingSource) ReadAt(p []byte, gpa int64) (int, error) {
	c.reads.Add(1)
	return c.TCG.ReadAt(p, gpa)
}

// checkScan fails unless every user process the guest lists is in ps.
func checkScan(b *testing.B, what string, ps []introspect.Process, guest []testlinux.Proc) {
	b.Helper()
	have := make(map[int]bool, len(ps))
	for _, p := range ps {
		have[p.PID] = true
	}
	missing := 0
	for _, g := range guest {
		if g.PID != 2 && g.PPID != 2 && !have[g.PID] {
			missing++
		}
	}
	if missing > 0 {
		b.Fatalf("%s: %d of the guest's %d processes not listed (we list %d)", what, missing, len(guest), len(ps))
	}
}

// BenchmarkPS is `ps` on the production path, against a live `kvmscope
// run` guest whose kernel was found by an earlier request:
//   - ns/op and api-ms: GET /v1/processes on kvmscope run's socket, from
//     request to the last byte of the reply (scan, JSON, unix-socket HTTP);
//     scan-ms is the server's own time for the scan (its
//     Kvmscope-Scan-Duration-Ns header), read-kb and reads what the scan
//     read of guest memory (its other headers);
//   - cli-ms: `kvmscope ps --json --api SOCK` end to end, a process of its
//     own as a user runs it, output to a pipe;
//   - integrity-ms: one full `kvmscope integrity --json --api SOCK`, end
//     to end (no target: the issue asks for the number).
//
// Each size runs on QEMU's default anonymous RAM (one process_vm_readv
// per read call) and, as "-memfd", on memfd-backed RAM that kvmscope maps
// and reads in place. Targets: 1 ms (100 processes) and 20 ms (5,000)
// through the socket, 60 ms for the CLI, 4 MB read per scan; each
// target/measured ratio >= 1 meets its target.
func BenchmarkPS(b *testing.B) {
	for _, c := range []psCase{
		{"procs=100", "tcg", 3, 512, false, time.Millisecond},
		{"procs=100-memfd", "tcg", 3, 512, true, time.Millisecond},
		{"procs=5000", "tcg", 4900, 1024, false, 20 * time.Millisecond},
		{"procs=5000-memfd", "tcg", 4900, 1024, true, 20 * time.Millisecond},
	} {
		b.Run(c.name, func(b *testing.B) { benchPS(b, c) })
	}
}

// BenchmarkPSKVM is BenchmarkPS on a guest that runs on KVM: here where
// KVM can boot Linux, else in the nested-KVM lab (scripts/bench.sh).
func BenchmarkPSKVM(b *testing.B) {
	// Not memfd RAM: in the lab under -icount (scripts/bench.sh) that guest
	// made no progress in 10 minutes (docs/limitations.md); the KVM memfd
	// path is covered by TestGuestLinux/debian-6.1-kvm-memfd.
	for _, c := range []psCase{
		{"procs=100", "kvm", 3, 512, false, time.Millisecond},
	} {
		b.Run(c.name, func(b *testing.B) {
			testenv.Require(b, testenv.FastKVM)
			benchPS(b, c)
		})
	}
}

// psCase is one guest of the ps benchmarks.
type psCase struct {
	name   string
	accel  string
	extra  int // kvmscope.procs
	memMB  int // 512 MiB allows ~3,900 tasks (threads-max)
	memfd  bool
	target time.Duration
}

func benchPS(b *testing.B, c psCase) {
	const cliTarget, readTarget = 60 * time.Millisecond, 4e6
	sg := bootScanGuestOn(b, c.accel, c.extra, c.memMB, c.memfd)
	ctx := context.Background()
	// Discovery, then the scans timed.
	first, err := sg.scanAPI(ctx)
	if err != nil {
		b.Fatal(err)
	}
	checkScan(b, "GET /v1/processes", first.procs, sg.g.PS())
	sleeps := 0
	for _, p := range first.procs {
		if strings.Join(p.Cmdline, " ") == "sleep 100000" {
			sleeps++
		}
	}
	if sleeps < 40+c.extra {
		b.Fatalf("%d processes with command line \"sleep 100000\"; the guest runs %d", sleeps, 40+c.extra)
	}
	var calls, scans []time.Duration
	var bytes, reads float64
	n := 0
	for b.Loop() {
		r, err := sg.scanAPI(ctx)
		if err != nil {
			b.Fatal(err)
		}
		calls = append(calls, r.wall)
		scans = append(scans, r.scan)
		bytes += float64(r.readBytes)
		reads += float64(r.reads)
		n = len(r.procs)
	}
	var clis []time.Duration
	for range 7 {
		t0 := time.Now()
		out, errOut, code := kvmscopeB(b, "ps", "--json", "--api", sg.sock)
		clis = append(clis, time.Since(t0))
		if code != 0 {
			b.Fatalf("kvmscope ps --json: %s", errOut)
		}
		if !strings.Contains(out, `"comm":"sleep"`) {
			b.Fatalf("kvmscope ps --json lists no sleep process")
		}
	}
	// One full integrity check of the dispatch (tables, dispatch code,
	// IDT, vCPU registers; the guest paused for the read), CLI end to end.
	var checks []time.Duration
	for range 5 {
		t0 := time.Now()
		out, errOut, code := kvmscopeB(b, "integrity", "--json", "--api", sg.sock)
		checks = append(checks, time.Since(t0))
		if code != 0 || strings.TrimSpace(out) != "[]" {
			b.Fatalf("kvmscope integrity: code %d: %s%s", code, out, errOut)
		}
	}
	b.ReportMetric(ms(medianDuration(checks)), "integrity-ms")
	med, cli := medianDuration(calls), medianDuration(clis)
	perScan := bytes / float64(len(calls))
	b.ReportMetric(float64(n), "procs")
	b.ReportMetric(ms(med), "api-ms")
	b.ReportMetric(ms(quantileDuration(calls, 0.9)), "api-p90-ms")
	b.ReportMetric(ms(medianDuration(scans)), "scan-ms")
	b.ReportMetric(perScan/1e3, "read-kb")
	b.ReportMetric(reads/float64(len(calls)), "reads")
	b.ReportMetric(ms(cli), "cli-ms")
	b.ReportMetric(ms(c.target), "target-ms")
	b.ReportMetric(c.target.Seconds()/med.Seconds(), "target-ratio")
	b.ReportMetric(cliTarget.Seconds()/cli.Seconds(), "cli-target-ratio")
	b.ReportMetric(readTarget/perScan, "read-target-ratio")
}

// apiScan is one GET /v1/processes as timed by the client, with what the
// server says of its scan.
type apiScan struct {
	wall, scan       time.Duration
	readBytes, reads int64
	procs            []introspect.Process
}

// scanAPI makes one GET /v1/processes on the guest's socket: wall is from
// the request to the last byte of the reply, before decoding it.
func (sg *scanGuest) scanAPI(ctx context.Context) (apiScan, error) {
	var r apiScan
	t0 := time.Now()
	resp, err := sg.api.Response(ctx, "/v1/processes")
	if err != nil {
		return r, err
	}
	raw, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	r.wall = time.Since(t0)
	if err != nil {
		return r, err
	}
	h := resp.Header
	for _, v := range []struct {
		name string
		to   *int64
	}{{api.HeaderScanReadBytes, &r.readBytes}, {api.HeaderScanReads, &r.reads}, {api.HeaderScanDuration, (*int64)(&r.scan)}} {
		if *v.to, err = strconv.ParseInt(h.Get(v.name), 10, 64); err != nil {
			return r, fmt.Errorf("GET /v1/processes: header %s: %v", v.name, err)
		}
	}
	var ps []api.Process
	if err := json.Unmarshal(raw, &ps); err != nil {
		return r, fmt.Errorf("decode GET /v1/processes: %w", err)
	}
	for _, p := range ps {
		r.procs = append(r.procs, p.Process)
	}
	return r, nil
}

// BenchmarkFirstContact is the time from first contact with a 512 MiB
// guest to its first process list, discovery included (kernel location,
// KASLR, kallsyms, BTF, offsets), target 300 ms:
//   - in-process: a fresh TCG source (memory map from QMP) and a fresh
//     session, then Processes; ns/op and first-ms/ratio are this.
//   - the first GET /v1/processes on a `kvmscope run` that has not
//     scanned yet (one sample per boot: api-first-ms).
//   - core: the same guest from an ELF core (guestmem.OpenCore on a
//     QEMU dump-guest-memory file), for reference (core-ms).
func BenchmarkFirstContact(b *testing.B) {
	const target = 300 * time.Millisecond
	sg := bootScanGuest(b, 0, 512, false)
	ctx := context.Background()
	t0 := time.Now()
	var apiPS []api.Process
	if err := sg.api.Get(ctx, "/v1/processes", &apiPS); err != nil {
		b.Fatal(err)
	}
	apiFirst := time.Since(t0)

	core := filepath.Join(b.TempDir(), "guest.core")
	if _, errOut, code := kvmscopeB(b, "dump", "--api", sg.sock, "-o", core); code != 0 {
		b.Fatalf("kvmscope dump: %s", errOut)
	}
	var cores []time.Duration
	for range 3 {
		t0 := time.Now()
		c, err := guestmem.OpenCore(core)
		if err != nil {
			b.Fatal(err)
		}
		s, err := session.New(session.Frozen{Src: c}, nil).Processes(ctx, introspect.ProcessOptions{}, false)
		cores = append(cores, time.Since(t0))
		c.Close()
		if err != nil {
			b.Fatalf("first contact on the core: %v", err)
		}
		checkScan(b, "core", s.Processes, sg.g.PS())
	}

	var lives []time.Duration
	n := 0
	for b.Loop() {
		t0 := time.Now()
		s, err := session.New(session.Frozen{Src: sg.source()}, nil).Processes(ctx, introspect.ProcessOptions{}, false)
		d := time.Since(t0)
		if err != nil {
			b.Fatalf("first contact on the live guest: %v", err)
		}
		lives = append(lives, d)
		if n == 0 {
			checkScan(b, "live", s.Processes, sg.g.PS())
		}
		n = len(s.Processes)
	}
	med := medianDuration(lives)
	b.ReportMetric(float64(n), "procs")
	b.ReportMetric(ms(med), "first-ms")
	b.ReportMetric(ms(apiFirst), "api-first-ms")
	b.ReportMetric(ms(medianDuration(cores)), "core-ms")
	b.ReportMetric(ms(target), "target-ms")
	b.ReportMetric(target.Seconds()/med.Seconds(), "target-ratio")
	b.ReportMetric(target.Seconds()/apiFirst.Seconds(), "api-target-ratio")
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func quantileDuration(ds []time.Duration, q float64) time.Duration {
	fs := make([]float64, len(ds))
	for i, d := range ds {
		fs[i] = float64(d)
	}
	return time.Duration(quantile(fs, q))
}

// kvmscopeB runs the CLI from a benchmark.
func kvmscopeB(b *testing.B, args ...string) (string, string, int) {
	b.Helper()
	var out, errb strings.Builder
	cmd := exec.Command(kvmscopeBin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.String(), errb.String(), ee.ExitCode()
	} else if err != nil {
		b.Fatal(err)
	}
	return out.String(), errb.String(), 0
}
