package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/guestmem/qmp"
	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/rs/zerolog"
)

// AttachOptions are kvmscope attach's: a QEMU that is already running,
// reached through a QMP socket or libvirt, with no ptrace at all (the
// read-only mode of docs/attach.md).
type AttachOptions struct {
	// PID is QEMU's process; QMP its monitor socket (one kvmscope may
	// use: QEMU serves each QMP socket to one client at a time).
	PID int
	QMP string
	// Domain, instead of QMP, is a libvirt domain, whose monitor libvirt
	// owns: commands go through virsh qemu-monitor-command on URI
	// (default qemu:///system). PID then defaults to libvirt's pid file
	// of the domain, and Name to Domain.
	Domain, URI string
	// Ptrace also seizes QEMU's threads (no filter, no EXITKILL) and takes
	// its vCPU handles: fresh registers from kvm_run, SIGSTOP pauses and,
	// with AllowWrite, memory and register writes (KVM only).
	Ptrace, AllowWrite bool
	// Socket is the API socket ("" means SocketDir/NAME.sock); Name the
	// VM's name ("" means qemu-PID).
	Socket, SocketDir, Name string
	Groups                  []int
	// Judging is as for Run.
	Judging
	Log zerolog.Logger
	// Ready, when set, is closed once the API serves (tests).
	Ready chan struct{}
}

// attachTarget is an attached QEMU: memory and registers through QMP
// and QEMU's own address space (guestmem.TCG reads any QEMU so, KVM or
// TCG), pause through QMP stop and cont.
type attachTarget struct {
	pid      int
	name     string
	qmp      guestmem.Monitor
	src      guestmem.Source // *guestmem.TCG, or *guestmem.Attached with tr
	kvm      bool
	tr       *tracer.Tracer // with --ptrace
	writable bool
}

func (a *attachTarget) Source() (guestmem.Source, error) { return a.src, nil }

// Pause stops the VM with QMP, and resume lets it go on, unless it was
// already stopped (by its owner) before: attaching changes nothing. With
// --ptrace it stops every QEMU thread as run does (tracer.Tracer.Pause),
// which register writes need.
func (a *attachTarget) Pause(ctx context.Context) (func(), error) {
	if a.tr != nil {
		return a.tr.Pause(ctx)
	}
	if a.qmp == nil {
		return nil, fmt.Errorf("attached without a monitor or a trace: %w", session.ErrNoPause)
	}
	running, _, err := guestmem.Status(ctx, a.qmp)
	if err != nil {
		return nil, err
	}
	if !running {
		return func() {}, nil
	}
	if _, err := a.qmp.Execute(ctx, "stop", nil); err != nil {
		return nil, fmt.Errorf("QMP stop: %w", err)
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		a.qmp.Execute(ctx, "cont", nil)
	}, nil
}

func (a *attachTarget) Describe() api.VM {
	out := api.VM{Name: a.name, Pid: a.pid, TracerPid: 0, Accel: "tcg", Writable: a.writable, VCPUs: []api.VCPUInfo{}, Regions: []api.RegionOut{}}
	if a.kvm {
		out.Accel = "kvm"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if a.tr != nil {
		out.TracerPid = os.Getpid()
		for _, v := range a.tr.VM().VCPUs() {
			out.VCPUs = append(out.VCPUs, api.VCPUInfo{ID: v.ID, TID: v.TID})
		}
	} else if cpus, err := a.src.CPUs(ctx); err == nil {
		for _, c := range cpus {
			out.VCPUs = append(out.VCPUs, api.VCPUInfo{ID: c.ID})
		}
	}
	for _, rg := range a.src.Regions() {
		out.Regions = append(out.Regions, api.RegionOut{GPA: api.Hex64(rg.GPA), Size: api.Hex64(rg.Size), ReadOnly: rg.ReadOnly, Name: rg.Name})
	}
	return out
}

// Attach serves the API of the running QEMU o.PID until it exits or
// kvmscope is told to stop (SIGINT, SIGTERM): the same session and API as
// Run, read-only. It never traces QEMU and changes nothing in it, so
// stopping (or killing) kvmscope leaves QEMU exactly as it was.
func Attach(o AttachOptions) error {
	err := attach(o)
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("%w; %s", err, attachPermission(o.PID))
	}
	return err
}

// attachPermission says what attaching to QEMU pid needs, for an error
// that is EACCES or EPERM: reading /proc/PID/maps and mem, pidfd_getfd
// and ptrace all take ptrace access to QEMU (ptrace(2), "Ptrace access
// mode checking").
func attachPermission(pid int) string {
	who := ""
	if st, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
			who = fmt.Sprintf(" (it runs as uid %d, kvmscope as %d)", sys.Uid, os.Geteuid())
		}
	}
	need := fmt.Sprintf("attaching needs ptrace access to QEMU %d%s: run kvmscope as QEMU's user or as root", pid, who)
	if b, err := os.ReadFile("/proc/sys/kernel/yama/ptrace_scope"); err == nil && os.Geteuid() != 0 {
		switch scope := strings.TrimSpace(string(b)); scope {
		case "0":
		case "3":
			need += "; Yama ptrace_scope 3 forbids it to everyone"
		default:
			need += "; Yama ptrace_scope " + scope + " also asks for CAP_SYS_PTRACE"
		}
	}
	return need
}

func attach(o AttachOptions) error {
	log := o.Log
	q, via, err := attachMonitor(&o)
	if err != nil {
		return err
	}
	var tcg *guestmem.TCG
	pid := func() int { return o.PID }
	writable := o.Ptrace && o.AllowWrite
	if q == nil {
		// No monitor: guest RAM from QEMU's command line and mappings,
		// checked below by finding the kernel where it says.
		if tcg, err = guestmem.NewInferred(o.PID, writable); err != nil {
			return err
		}
	} else {
		defer q.Close()
		tcg = guestmem.NewTCG(q, pid, writable)
	}
	src := tcg
	// The map QMP gives must be QEMU o.PID's: every RAM region's host
	// address is one of its mappings. A QMP socket of another QEMU (or a
	// map that cannot be checked) is an error, never a guess.
	if err := src.VerifyMap(); err != nil {
		return fmt.Errorf("attach to QEMU %d through %s: %w", o.PID, via, err)
	}
	kvm := ownsKVM(o.PID)
	if q != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		kvm, err = qmpKVM(ctx, q)
		cancel()
		if err != nil {
			return err
		}
	}
	target := &attachTarget{pid: o.PID, qmp: q, src: src, kvm: kvm}
	if o.Ptrace {
		if !kvm {
			return fmt.Errorf("attach --ptrace to QEMU %d: it runs its guest under TCG: there are no vCPU handles to take (attach without --ptrace)", o.PID)
		}
		t, err := tracer.AttachRunning(o.PID, log)
		if err != nil {
			return fmt.Errorf("attach --ptrace: %w", err)
		}
		if o.Domain != "" && !t.OwnChildren() {
			// Each monitor command is a virsh child, whose exit the
			// tracer would take. libvirt starts QEMU in a process
			// group of its own, so this is a QEMU started by hand.
			t.Detach()
			return fmt.Errorf("attach --ptrace --vm: QEMU %d is in kvmscope's process group, so the trace would take the exits of virsh: start kvmscope from another shell, or use --qmp", o.PID)
		}
		// However we leave, QEMU goes on untraced, kvm_run as it was.
		defer t.Detach()
		target.tr, target.writable = t, o.AllowWrite
		target.src = guestmem.NewAttached(tcg, t.VM(), o.AllowWrite)
	}
	name := o.Name
	if name == "" {
		name = "qemu-" + strconv.Itoa(o.PID)
	}
	dir := o.SocketDir
	if dir == "" {
		dir = api.DefaultDir()
	}
	sock := o.Socket
	if sock == "" {
		if err := prepareDir(dir, o.Groups); err != nil {
			return fmt.Errorf("socket directory: %w", err)
		}
		sock = SocketPath(dir, name)
	}
	target.name = name
	sess := session.New(target, nil)
	if q == nil {
		if err := verifyInferred(sess, src); err != nil {
			return fmt.Errorf("attach to QEMU %d without a monitor: the memory map inferred from its command line and /proc/%d/maps is not verified: %w", o.PID, o.PID, err)
		}
	}
	events, err := eventlog.Open(EventsPath(sock), 0o640)
	if err != nil {
		return fmt.Errorf("event log: %w", err)
	}
	defer events.Close()
	detach := make(chan struct{})
	var once sync.Once
	server := &api.Server{Target: target, Session: sess, Log: log, Groups: o.Groups, Events: events, BaselinePath: BaselinePath(sock),
		Detach: func() { once.Do(func() { close(detach) }) }}
	done := make(chan struct{})
	go watchPID(o.PID, done)
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	go func() { <-done; stop() }()
	watch := o.Judging.start(runCtx, server, o.PID, log)
	if err := server.Listen(sock); err != nil {
		return fmt.Errorf("API socket: %w", err)
	}
	defer server.Close()
	mode := "read-only, no ptrace"
	if o.Ptrace {
		mode = "ptrace, read-only"
		if o.AllowWrite {
			mode = "ptrace, writable"
		}
	}
	log.Info().Str("socket", sock).Int("pid", o.PID).Bool("kvm", kvm).Str("mode", mode).Msg("attached; serving the VM's API")
	if o.Ready != nil {
		close(o.Ready)
	}
	stopSig := stopSignals(watch)
	for {
		select {
		case s := <-stopSig:
			log.Info().Str("signal", s.String()).Msg("detached; QEMU runs on")
			return nil
		case <-detach:
			log.Info().Msg("detached (kvmscope detach); QEMU runs on")
			return nil
		case <-done:
			log.Info().Msg("QEMU exited")
			return nil
		}
	}
}

// attachMonitor reaches QEMU's monitor as o says, filling in o's PID and
// Name for a libvirt domain; via names it for errors.
func attachMonitor(o *AttachOptions) (q guestmem.Monitor, via string, err error) {
	switch {
	case o.Domain != "" && o.QMP != "":
		return nil, "", errors.New("a QMP socket or a libvirt domain, not both")
	case o.Domain != "":
		uri := o.URI
		if uri == "" {
			uri = "qemu:///system"
		}
		if o.PID == 0 {
			if o.PID, err = libvirtPID(uri, o.Domain); err != nil {
				return nil, "", err
			}
		}
		if o.Name == "" {
			o.Name = o.Domain
		}
		return &qmp.Virsh{URI: uri, Domain: o.Domain}, "libvirt domain " + o.Domain, nil
	case o.QMP != "":
		if o.PID == 0 {
			return nil, "", errors.New("a QMP socket needs QEMU's pid")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := guestmem.DialQMP(ctx, o.QMP)
		if err != nil {
			return nil, "", fmt.Errorf("QMP socket %s: %w", o.QMP, err)
		}
		return c, o.QMP, nil
	}
	if o.PID == 0 {
		return nil, "", errors.New("no QEMU pid")
	}
	return nil, fmt.Sprintf("/proc/%d/maps", o.PID), nil
}

// ownsKVM reports whether process pid holds a KVM VM (an fd linking to
// anon_inode:kvm-vm).
func ownsKVM(pid int) bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if l, _ := os.Readlink(dir + "/" + e.Name()); l == "anon_inode:kvm-vm" {
			return true
		}
	}
	return false
}

// libvirtPID reads the pid file libvirt keeps for a running domain's QEMU:
// /run/libvirt/qemu/NAME.pid for qemu:///system, under
// $XDG_RUNTIME_DIR/libvirt/qemu/run for qemu:///session. The map check
// that follows (VerifyMap) catches a stale one.
func libvirtPID(uri, domain string) (int, error) {
	var path string
	switch {
	case strings.HasPrefix(uri, "qemu:///system"):
		path = "/run/libvirt/qemu/" + domain + ".pid"
	case strings.HasPrefix(uri, "qemu:///session"):
		path = filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "libvirt/qemu/run", domain+".pid")
	default:
		return 0, fmt.Errorf("libvirt domain %s on %s: give QEMU's pid (--pid): its pid file is known for qemu:///system and qemu:///session only", domain, uri)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("libvirt domain %s is not running on %s (no %s): %w", domain, uri, path, errors.Unwrap(err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("libvirt domain %s: %s holds %q, not a pid", domain, path, strings.TrimSpace(string(b)))
	}
	return pid, nil
}

// qmpKVM says whether QEMU runs its guest on KVM.
func qmpKVM(ctx context.Context, q guestmem.Monitor) (bool, error) {
	raw, err := q.Execute(ctx, "query-kvm", nil)
	if err != nil {
		return false, fmt.Errorf("QMP query-kvm: %w", err)
	}
	var st struct {
		Enabled bool `json:"enabled"`
		Present bool `json:"present"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return false, fmt.Errorf("QMP query-kvm: %w", err)
	}
	return st.Enabled, nil
}

// watchPID closes done when process pid is gone.
func watchPID(pid int, done chan<- struct{}) {
	for syscall.Kill(pid, 0) == nil {
		time.Sleep(500 * time.Millisecond)
	}
	close(done)
}

// verifyInferred checks a map built without a monitor: the guest kernel
// must be where it says (its image, page tables and symbols found through
// it), and every range of RAM in the firmware map the kernel kept must be
// in it, which a wrong split around the PCI hole fails. A kernel without
// that map in its symbols (no CONFIG_KALLSYMS_ALL) is taken on the first
// check alone only when all RAM is below 2 GiB, where no machine splits.
func verifyInferred(sess *session.Session, src guestmem.Source) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, _, _, err := sess.Kernel(ctx); err != nil {
		return err
	}
	_, err := sess.CheckMemoryMap(ctx)
	if rs := src.Regions(); errors.Is(err, introspect.ErrNoE820) && len(rs) == 1 && rs[0].End() <= 2<<30 {
		return nil
	}
	return err
}
