package testlinux

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/guestmem/qmp"
)

// Options say what to boot and how.
type Options struct {
	// Kernel is the bzImage to boot (e.g. Paths.DebianKernel). Required.
	Kernel string
	// Initrd defaults to the fetched busybox initramfs.
	Initrd string
	// MemMB defaults to 512, SMP to 2.
	MemMB int
	SMP   int
	// Append is added to the default kernel command line
	// "console=ttyS0 loglevel=3 panic=-1 no_timer_check" (e.g. "nokaslr").
	Append string
	// Wrapper is prepended before the QEMU binary, e.g.
	// []string{"/path/kvmscope", "run", "--"}.
	Wrapper []string
	// ExtraArgs are appended to QEMU's arguments.
	ExtraArgs []string
	// Timeout bounds the wait for the guest's process table; default 90 s.
	Timeout time.Duration
	// Accel is QEMU's accelerator, "tcg" (the default) or "kvm".
	Accel string
}

// Proc is one process as the guest itself lists it in /proc.
type Proc struct {
	PID, PPID, UID, GID int
	// Comm is the Name: line of /proc/PID/status. For workqueue workers
	// the kernel appends the workqueue ("kworker/0:1-events"); the
	// task's comm is the part before the '-'.
	Comm string
}

// Guest is a running QEMU with a booted test guest.
type Guest struct {
	dir      string
	serial   string
	qmpPath  string
	qmp2Path string
	cmd      *exec.Cmd
	stderr   *os.File
	exited   chan struct{}
	waitErr  error
	qmp      *qmp.Client
	ps       []Proc
	kallsyms map[string]uint64
	release  string
	bootTime time.Duration
}

const (
	markPSBegin = "KVMSCOPE-PS-BEGIN"
	markPSEnd   = "KVMSCOPE-PS-END"
	markKsBegin = "KVMSCOPE-KALLSYMS-BEGIN"
	markKsEnd   = "KVMSCOPE-KALLSYMS-END"
	markUname   = "KVMSCOPE-UNAME "
)

func findQEMU() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("qemu-system-x86_64 not installed: %w", err)
	}
	return p, nil
}

// Boot starts QEMU (TCG unless opts.Accel says kvm) on opts.Kernel and the busybox initramfs, and
// waits until the guest has printed its process table. The guest then
// idles: its user processes stay as listed until Close.
func Boot(ctx context.Context, opts Options) (*Guest, error) {
	g, err := boot(ctx, opts)
	if errors.Is(err, errGuestEnded) && ctx.Err() == nil {
		// A TCG guest on an overloaded host now and then panics early
		// (timer calibration) and, with -no-reboot, ends QEMU. That is
		// the host, not the code under test: boot once more, and let a
		// second failure stand.
		fmt.Fprintf(os.Stderr, "testlinux: guest ended early, booting it again: %v\n", err)
		return boot(ctx, opts)
	}
	return g, err
}

// errGuestEnded marks a boot whose QEMU exited before the guest was ready.
var errGuestEnded = errors.New("the guest ended before it was ready")

func boot(ctx context.Context, opts Options) (*Guest, error) {
	if opts.Kernel == "" {
		return nil, errors.New("testlinux: Options.Kernel is empty")
	}
	if opts.Initrd == "" {
		p, err := Guests()
		if err != nil {
			return nil, err
		}
		opts.Initrd = p.Initrd
	}
	if opts.MemMB == 0 {
		opts.MemMB = 512
	}
	if opts.SMP == 0 {
		opts.SMP = 2
	}
	if opts.Timeout == 0 {
		opts.Timeout = 90 * time.Second
	}
	qemu, err := findQEMU()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kvmscope-guest-")
	if err != nil {
		return nil, err
	}
	g := &Guest{
		dir:      dir,
		serial:   filepath.Join(dir, "serial.log"),
		qmpPath:  filepath.Join(dir, "qmp.sock"),
		qmp2Path: filepath.Join(dir, "qmp2.sock"),
		exited:   make(chan struct{}),
	}
	// no_timer_check: under TCG on a loaded host the kernel's IO-APIC
	// timer check can miss its window and panic ("IO-APIC + timer doesn't
	// work!"); cloud images pass it to virtual machines for that reason.
	appendLine := "console=ttyS0 loglevel=3 panic=-1 no_timer_check"
	if opts.Append != "" {
		appendLine += " " + opts.Append
	}
	if opts.Accel == "" {
		opts.Accel = "tcg"
	}
	args := []string{
		"-accel", opts.Accel,
		"-machine", "pc",
		"-m", strconv.Itoa(opts.MemMB),
		"-smp", strconv.Itoa(opts.SMP),
		// -nodefaults: no NIC (whose option ROM slows boot), no VGA.
		"-nodefaults", "-no-user-config", "-nographic",
		"-kernel", opts.Kernel,
		"-initrd", opts.Initrd,
		"-append", appendLine,
		"-serial", "file:" + g.serial,
		"-qmp", "unix:" + g.qmpPath + ",server=on,wait=off",
		"-qmp", "unix:" + g.qmp2Path + ",server=on,wait=off",
		"-no-reboot",
	}
	args = append(args, opts.ExtraArgs...)
	argv := append(append([]string{}, opts.Wrapper...), qemu)
	argv = append(argv, args...)
	g.stderr, err = os.Create(filepath.Join(dir, "stderr.log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	g.cmd = exec.Command(argv[0], argv[1:]...)
	g.cmd.Stdout = g.stderr
	g.cmd.Stderr = g.stderr
	// Its own process group, so Close also ends a wrapper's QEMU.
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := g.cmd.Start(); err != nil {
		g.stderr.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	go func() {
		g.waitErr = g.cmd.Wait()
		close(g.exited)
	}()
	if err := g.waitReady(ctx, opts.Timeout); err != nil {
		g.Close()
		return nil, err
	}
	g.bootTime = time.Since(start)
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	g.qmp, err = qmp.Dial(dialCtx, g.qmpPath)
	cancel()
	if err != nil {
		g.Close()
		return nil, err
	}
	return g, nil
}

// waitReady polls the serial log until the process table is complete.
func (g *Guest) waitReady(ctx context.Context, timeout time.Duration) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("boot guest: %w", ctx.Err())
		case <-timer.C:
			return fmt.Errorf("boot guest: no %s on the serial console after %v; stderr ends with:\n%s\nserial ends with:\n%s",
				markPSEnd, timeout, tail(g.stderrText(), 3000), tail(g.Serial(), 2000))
		case <-g.exited:
			return fmt.Errorf("boot guest: %w: QEMU exited (%v); stderr:\n%s\nserial ends with:\n%s", errGuestEnded,
				g.waitErr, tail(g.stderrText(), 2000), tail(g.Serial(), 2000))
		case <-tick.C:
			s := g.Serial()
			if !strings.Contains(s, markPSEnd) {
				continue
			}
			return g.parse(s)
		}
	}
}

// parse reads the blocks /init printed.
func (g *Guest) parse(serial string) error {
	g.kallsyms = map[string]uint64{}
	block := ""
	sc := bufio.NewScanner(strings.NewReader(serial))
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		// Firmware's terminal escapes can precede a marker on its line.
		if i := strings.Index(line, "KVMSCOPE-"); i > 0 {
			line = line[i:]
		}
		switch {
		case line == markPSBegin, line == markKsBegin:
			block = line
			continue
		case line == markPSEnd, line == markKsEnd:
			block = ""
			continue
		case strings.HasPrefix(line, markUname):
			g.release = strings.TrimPrefix(line, markUname)
			continue
		}
		switch block {
		case markPSBegin:
			f := strings.SplitN(line, " ", 5)
			if len(f) != 5 {
				return fmt.Errorf("guest process table: bad line %q", line)
			}
			var n [4]int
			for i := range n {
				v, err := strconv.Atoi(f[i])
				if err != nil {
					return fmt.Errorf("guest process table: bad line %q: %w", line, err)
				}
				n[i] = v
			}
			g.ps = append(g.ps, Proc{PID: n[0], PPID: n[1], UID: n[2], GID: n[3], Comm: f[4]})
		case markKsBegin:
			f := strings.Fields(line)
			if len(f) < 3 {
				continue
			}
			if a, err := strconv.ParseUint(f[0], 16, 64); err == nil {
				g.kallsyms[f[2]] = a
			}
		}
	}
	if len(g.ps) == 0 {
		return errors.New("guest printed an empty process table")
	}
	return nil
}

// PS returns the guest's process table as /init printed it, sorted as
// /proc lists it.
func (g *Guest) PS() []Proc { return append([]Proc(nil), g.ps...) }

// Kallsyms returns a few symbols from the guest's /proc/kallsyms (read by
// root with kptr_restrict 0): _text, linux_banner, init_task,
// sys_call_table, init_top_pgt, page_offset_base and others; see
// scripts/initramfs/init.
func (g *Guest) Kallsyms() map[string]uint64 { return g.kallsyms }

// Release is the guest's `uname -r`.
func (g *Guest) Release() string { return g.release }

// BootTime is the time from starting QEMU to the guest's process table.
func (g *Guest) BootTime() time.Duration { return g.bootTime }

// Pid is the process id of the started process (QEMU, or the wrapper).
func (g *Guest) Pid() int { return g.cmd.Process.Pid }

// SpareQMP is the path of a second QMP socket that nothing is connected to,
// for the code under test.
func (g *Guest) SpareQMP() string { return g.qmp2Path }

// Serial returns everything the guest wrote to its serial console so far.
func (g *Guest) Serial() string {
	b, _ := os.ReadFile(g.serial)
	return string(b)
}

func (g *Guest) stderrText() string {
	b, _ := os.ReadFile(filepath.Join(g.dir, "stderr.log"))
	return string(b)
}

// qmpTimeout bounds one QMP or HMP command of the tests.
const qmpTimeout = 60 * time.Second

var errNoQMP = errors.New("QMP not connected")

// QMP runs a QMP command and returns its "return" value; args may be nil.
func (g *Guest) QMP(cmd string, args any) (json.RawMessage, error) {
	if g.qmp == nil {
		return nil, errNoQMP
	}
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	return g.qmp.Execute(ctx, cmd, args)
}

// HMP runs a human monitor command (e.g. "info registers") and returns its
// output.
func (g *Guest) HMP(cmdline string) (string, error) {
	if g.qmp == nil {
		return "", errNoQMP
	}
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	return g.qmp.HMP(ctx, cmdline)
}

// Dump writes guest memory as an ELF core to path with QMP
// dump-guest-memory (physical memory, paging=false) and waits for it.
func (g *Guest) Dump(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if _, err := g.QMP("dump-guest-memory", map[string]any{
		"paging": false, "protocol": "file:" + abs, "detach": false,
	}); err != nil {
		return err
	}
	// Without detach the command returns when the dump is written;
	// query-dump confirms.
	deadline := time.Now().Add(60 * time.Second)
	for {
		r, err := g.QMP("query-dump", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status string `json:"status"`
		}
		if err := json.Unmarshal(r, &st); err != nil {
			return fmt.Errorf("query-dump: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed":
			return fmt.Errorf("dump-guest-memory to %s failed", abs)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("dump-guest-memory to %s: still %q after 60 s", abs, st.Status)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Close stops QEMU (and a wrapper) and removes the guest's files.
func (g *Guest) Close() error {
	if g.qmp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		g.qmp.Execute(ctx, "quit", nil)
		cancel()
		g.qmp.Close()
		g.qmp = nil
	}
	select {
	case <-g.exited:
	case <-time.After(5 * time.Second):
		syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
		<-g.exited
	}
	// A wrapper may leave its QEMU behind in the group.
	syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
	g.stderr.Close()
	return os.RemoveAll(g.dir)
}

func tail(s string, n int) string {
	if len(s) > n {
		s = s[len(s)-n:]
	}
	return string(bytes.ToValidUTF8([]byte(s), nil))
}
