// Package kvmlab is the nested-KVM lab: it runs kvmscope's KVM tests on a
// machine whose own /dev/kvm is missing or cannot boot Linux.
//
// It boots Debian's 6.1 cloud kernel (the one `just guests` fetches) as an
// L1 guest under TCG with AMD SVM and nested paging (-cpu EPYC,+svm,+npt).
// L1's /init loads that kernel's own irqbypass, kvm and kvm-amd, which gives
// a stock /dev/kvm, and runs inside it the packages' test binaries (built
// static with go test -c), the kvmscope binaries, the host's own QEMU with
// its libraries and firmware, the tiny test guest and the Linux guests, all
// packed into L1's initramfs. Each test binary's output comes back framed
// on L1's second serial port and is turned into go test events on the host
// (go tool test2json), so every verdict, failure and panic reaches the
// host's go test output. See docs/testing.md.
package kvmlab

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A Job is one test binary run inside L1.
type Job struct {
	// Package is the import path, e.g. github.com/kvmscope/kvmscope/cmd/kvmscope.
	Package string
	// Run is the -test.run pattern, e.g. ^(TestKVMCapture|TestDaemonize)$.
	Run string
	// Bench, when set, is the -test.bench pattern, and BenchTime its
	// -test.benchtime (default 1s).
	Bench, BenchTime string
	// Env is added to the test binary's environment (KEY=VALUE, no spaces
	// or commas).
	Env []string
	// Timeout bounds the binary (-test.timeout); default 10 minutes.
	Timeout time.Duration
}

// Config says what to run and how.
type Config struct {
	// Repo is the repository root (holding go.mod).
	Repo string
	// Work is a directory for the payload and the logs; it is kept so
	// that a failure can be read (console.log, results.log).
	Work string
	Jobs []Job
	// Timeout bounds the whole L1 run; default 30 minutes.
	Timeout time.Duration
	// MemMB is L1's memory (default 3072); SMP its vCPUs (default 1).
	MemMB, SMP int
	// NoKVM boots L1 without loading kvm (kvmlab.nokvm), to test the lab
	// itself; CPU overrides -cpu (default EPYC,+svm,+npt).
	NoKVM bool
	CPU   string
	// Kernel overrides L1's kernel (default: Debian's, from `just guests`).
	Kernel string
	// ICount, when set, runs L1 with -icount ICOUNT (e.g.
	// "shift=0,sleep=off"): L1's clock then counts the instructions TCG
	// executes, so times measured inside L1 no longer depend on how busy
	// the host is (benchmarks).
	ICount string
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// Result is what one job produced.
type Result struct {
	Job Job
	// Events are the test binary's go test events (test2json).
	Events []Event
	// ExitCode is the binary's exit status in L1; -1 when L1 ended or
	// timed out before the binary did.
	ExitCode int
	// Raw is the binary's output as it came over the serial port.
	Raw []byte
}

// Report is a finished lab run.
type Report struct {
	Results []Result
	// Record is the run record the gate wrote inside L1 (JSON lines of
	// testenv.Entry).
	Record []byte
	// Console is the path of L1's console log.
	Console string
	Took    time.Duration
	// PID was L1's QEMU, gone (with its process group) when Run returns.
	PID int
}

// Failed reports whether any job failed.
func (r *Report) Failed() bool {
	for _, res := range r.Results {
		if res.ExitCode != 0 {
			return true
		}
	}
	return false
}

//go:embed init.sh
var initScript []byte

// Run builds the payload, boots L1 once, runs every job inside it and
// returns what each produced. The error is one line: L1 did not boot, has
// no /dev/kvm, or ended or timed out before it was done. A failing test is
// not an error: it is in the results.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Minute
	}
	if cfg.MemMB == 0 {
		cfg.MemMB = 3072
	}
	if cfg.SMP == 0 {
		cfg.SMP = 1
	}
	if cfg.CPU == "" {
		cfg.CPU = "EPYC,+svm,+npt"
	}
	logf := func(format string, a ...any) {
		if cfg.Log != nil {
			fmt.Fprintf(cfg.Log, "kvmlab: "+format+"\n", a...)
		}
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()

	if err := os.MkdirAll(cfg.Work, 0o755); err != nil {
		return nil, fmt.Errorf("kvmlab: %w", err)
	}
	p, err := buildPayload(ctx, cfg, logf)
	if err != nil {
		return nil, fmt.Errorf("kvmlab: build the L1 payload: %w", err)
	}
	logf("payload %s (%d MiB) built in %v", p.initrd, p.size>>20, time.Since(start).Round(time.Second))

	console := filepath.Join(cfg.Work, "console.log")
	results := filepath.Join(cfg.Work, "results.log")
	os.Remove(results)
	appendLine := "console=ttyS0 loglevel=4 panic=-1 no_timer_check"
	if cfg.NoKVM {
		appendLine += " kvmlab.nokvm"
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, errors.New("kvmlab: qemu-system-x86_64 not installed (just setup)")
	}
	args := []string{
		"-accel", "tcg", "-cpu", cfg.CPU, "-machine", "pc",
		"-m", strconv.Itoa(cfg.MemMB), "-smp", strconv.Itoa(cfg.SMP),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-kernel", p.kernel, "-initrd", p.initrd, "-append", appendLine,
		"-serial", "file:" + console, "-serial", "file:" + results,
		"-no-reboot",
	}
	if cfg.ICount != "" {
		args = append(args, "-icount", cfg.ICount)
	}
	cmd := exec.Command(qemu, args...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	// Its own process group, killed whole; and killed with us if we die.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	bootStart := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("kvmlab: start L1: %w", err)
	}
	logf("L1 started (pid %d): %s", cmd.Process.Pid, strings.Join(cmd.Args, " "))
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	kill := func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}

	var timedOut bool
	var waitErr error
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	seen := 0
wait:
	for {
		select {
		case waitErr = <-exited:
			break wait
		case <-ctx.Done():
			timedOut = true
			kill()
			break wait
		case <-tick.C:
			// Progress: each job as it begins and ends.
			b, _ := os.ReadFile(results)
			for _, line := range strings.Split(string(b), "\n")[seen:] {
				if strings.HasPrefix(line, "KVMLAB-") && !strings.HasPrefix(line, "KVMLAB-RECORD") {
					logf("L1 %s (%v)", strings.TrimSpace(line), time.Since(bootStart).Round(time.Second))
				}
			}
			seen = strings.Count(string(b), "\n")
		}
	}
	// Nothing of L1 outlives us.
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	took := time.Since(bootStart)

	raw, _ := os.ReadFile(results)
	parsed := parseResults(raw)
	run := &Report{Console: console, Took: took, Record: parsed.record, PID: cmd.Process.Pid}
	for i, j := range cfg.Jobs {
		res := Result{Job: j, ExitCode: -1}
		if s, ok := parsed.jobs[jobName(i)]; ok {
			res.Raw, res.ExitCode = s.out, s.code
			if res.Events, err = testEvents(ctx, j.Package, s.out); err != nil {
				return nil, fmt.Errorf("kvmlab: %s: %w", j.Package, err)
			}
		}
		run.Results = append(run.Results, res)
	}
	last := lastLine(console)
	switch {
	case !parsed.booted && timedOut:
		return run, fmt.Errorf("kvmlab: L1 did not boot within %v (console %s ends: %q)", cfg.Timeout, console, last)
	case !parsed.booted:
		return run, fmt.Errorf("kvmlab: L1 did not boot: QEMU exited (%v) %s(console %s ends: %q)", waitErr, oneLine(stderr.String()), console, last)
	case parsed.noKVM != "":
		return run, fmt.Errorf("kvmlab: L1 has no /dev/kvm: %s", parsed.noKVM)
	case !parsed.done && timedOut:
		return run, fmt.Errorf("kvmlab: timed out after %v while running %s (console %s)", cfg.Timeout, parsed.current, console)
	case !parsed.done:
		return run, fmt.Errorf("kvmlab: L1 ended (%v) while running %s (console %s ends: %q)", waitErr, parsed.current, console, last)
	}
	logf("L1 finished %d jobs in %v", len(cfg.Jobs), took.Round(time.Second))
	return run, nil
}

// jobName names job i in /lab/jobs and on the results port.
func jobName(i int) string { return "job" + strconv.Itoa(i) }

// results are the framed sections of L1's results port.
type results struct {
	booted, done bool
	noKVM        string
	current      string // the job running when the stream ended
	jobs         map[string]section
	record       []byte
}

type section struct {
	out  []byte
	code int
}

func parseResults(b []byte) results {
	r := results{jobs: map[string]section{}}
	var cur *bytes.Buffer
	inRecord := false
	var record bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		f := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "KVMLAB-BOOTED"):
			r.booted = true
		case strings.HasPrefix(line, "KVMLAB-NOKVM "):
			r.noKVM = strings.TrimPrefix(line, "KVMLAB-NOKVM ")
		case len(f) == 2 && f[0] == "KVMLAB-BEGIN":
			r.current, cur = f[1], &bytes.Buffer{}
		case len(f) == 3 && f[0] == "KVMLAB-END" && cur != nil && f[1] == r.current:
			code, err := strconv.Atoi(f[2])
			if err != nil {
				code = -1
			}
			r.jobs[r.current] = section{out: cur.Bytes(), code: code}
			r.current, cur = "", nil
		case line == "KVMLAB-RECORD-BEGIN":
			inRecord = true
		case line == "KVMLAB-RECORD-END":
			inRecord, r.record = false, record.Bytes()
		case line == "KVMLAB-DONE":
			r.done = true
		case inRecord:
			record.WriteString(line + "\n")
		case cur != nil:
			cur.WriteString(line + "\n")
		}
	}
	if cur != nil {
		// Cut off: keep what came, as a job that did not finish.
		r.jobs[r.current] = section{out: cur.Bytes(), code: -1}
	}
	return r
}

func lastLine(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(bytes.ToValidUTF8(b, nil))), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// oneLine folds QEMU's stderr into one line, without the warnings about
// CPUID features TCG lacks (harmless, and many).
func oneLine(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.Contains(l, "doesn't support requested feature") {
			keep = append(keep, l)
		}
	}
	s = strings.Join(strings.Fields(strings.Join(keep, " ")), " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	if s != "" {
		s += " "
	}
	return s
}
