package launch

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/kvmscope/kvmscope/tracer"
	"golang.org/x/sys/unix"
)

// The in-place launch. The process that was asked to run QEMU (by libvirt,
// a shell, a test) becomes QEMU itself, so QEMU keeps its caller's pid,
// parent, cgroup, session and exit status: libvirt finds the vCPU threads
// under the pid it started (vCPU pinning, per-vCPU cgroups and stats work),
// and -daemonize needs nothing special. A separate kvmscope process, the
// tracer, attaches to it first:
//
//	front (pid P)                     tracer (re-executed kvmscope)
//	  fork+exec self, stage 1 ──────▶ stage 1: fork+exec self (stage 2), exit
//	  wait for stage 1                stage 2: new session, PTRACE_SEIZE(P)
//	  read the pipe          ◀──────  "ok FILTER" (or "error: ...")
//	  seccomp filter, execve QEMU     trace QEMU, serve the API
//
// The double fork makes the tracer nobody's child: QEMU never sees an
// extra child process. The entry point re-executes itself with its own argv
// (so the tracer gets the same options) and tracerEnv set.

// tracerEnv tells a re-executed kvmscope it is the tracer:
// "STAGE:PID:FD:QMPPATH".
const tracerEnv = "KVMSCOPE_TRACER"

// tracerStage is what a re-executed tracer learns from tracerEnv.
type tracerStage struct {
	stage   int
	pid     int // the front process, which becomes QEMU
	fd      int // write end of the pipe to the front process
	qmpPath string
}

// takeTracerStage reads and removes tracerEnv; ok is false in the front
// process.
func takeTracerStage() (ts tracerStage, ok bool, err error) {
	s, ok := os.LookupEnv(tracerEnv)
	if !ok {
		return ts, false, nil
	}
	os.Unsetenv(tracerEnv)
	f := strings.SplitN(s, ":", 4)
	if len(f) != 4 {
		return ts, true, fmt.Errorf("bad %s=%q", tracerEnv, s)
	}
	ts.stage, err = strconv.Atoi(f[0])
	if err == nil {
		ts.pid, err = strconv.Atoi(f[1])
	}
	if err == nil {
		ts.fd, err = strconv.Atoi(f[2])
	}
	if err != nil || ts.pid <= 0 || ts.fd < 3 {
		return ts, true, fmt.Errorf("bad %s=%q", tracerEnv, s)
	}
	ts.qmpPath = f[3]
	return ts, true, nil
}

func (ts tracerStage) env(stage int) string {
	return fmt.Sprintf("%s=%d:%d:%d:%s", tracerEnv, stage, ts.pid, ts.fd, ts.qmpPath)
}

// self is the running binary, for re-execution.
func self() string {
	if p, err := os.Executable(); err == nil {
		return p
	}
	return "/proc/self/exe"
}

// startTracer runs in the front process: it starts the tracer (through
// stage 1) and waits until the tracer has attached to us. It returns the
// seccomp filter the tracer made for its policy when we are traced and may
// exec QEMU.
func startTracer(qmpPath string) ([]unix.SockFilter, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("tracer pipe: %w", err)
	}
	r := os.NewFile(uintptr(p[0]), "tracer-r")
	defer r.Close()
	// The write end is the one fd of ours the tracer inherits.
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETFD, 0); err != nil {
		unix.Close(p[1])
		return nil, fmt.Errorf("tracer pipe: %w", err)
	}
	// Hosts with Yama ptrace_scope=1 let a process trace only its
	// descendants unless the tracee names its tracer; our tracer is not our
	// descendant after the double fork. Allow it until it has attached.
	yama := unix.Prctl(unix.PR_SET_PTRACER, unix.PR_SET_PTRACER_ANY, 0, 0, 0) == nil
	defer func() {
		if yama {
			unix.Prctl(unix.PR_SET_PTRACER, 0, 0, 0, 0)
		}
	}()
	ts := tracerStage{pid: os.Getpid(), fd: p[1], qmpPath: qmpPath}
	pid, err := syscall.ForkExec(self(), os.Args, &syscall.ProcAttr{
		Env:   append(os.Environ(), ts.env(1)),
		Files: []uintptr{devNull(), devNull(), 2},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	unix.Close(p[1])
	if err != nil {
		return nil, fmt.Errorf("start the tracer: %w", err)
	}
	var ws unix.WaitStatus
	unix.Wait4(pid, &ws, 0, nil)
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("the tracer ended before attaching (see its log above)")
	}
	line = strings.TrimSpace(line)
	filter, ok := strings.CutPrefix(line, "ok ")
	if !ok {
		return nil, fmt.Errorf("%s", strings.TrimPrefix(line, "error: "))
	}
	return tracer.DecodeFilter(filter)
}

var devNullFD = -1

// devNull returns an fd open on /dev/null (kept for the process lifetime).
func devNull() uintptr {
	if devNullFD < 0 {
		fd, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return 2
		}
		devNullFD = fd
	}
	return uintptr(devNullFD)
}

// runStage1 forks the real tracer into a new session and exits, so the
// tracer is reparented away from the front process (soon QEMU).
func runStage1(ts tracerStage) int {
	_, err := syscall.ForkExec(self(), os.Args, &syscall.ProcAttr{
		Env:   append(os.Environ(), ts.env(2)),
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		reply(ts.fd, "error: start the tracer: "+err.Error())
		return 1
	}
	return 0
}

// reply writes the tracer's answer to the front process and closes the
// pipe.
func reply(fd int, s string) {
	f := os.NewFile(uintptr(fd), "tracer-w")
	fmt.Fprintf(f, "%s\n", s)
	f.Close()
}

// closeInheritedFDs closes every fd above 2 that came from the front
// process's caller (libvirt's monitor and tap fds): the tracer must not
// keep them open, or QEMU's peers would not see them close with QEMU. Our
// own fds are close-on-exec; inherited ones are not. keep is spared.
func closeInheritedFDs(keep ...int) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 || slices.Contains(keep, fd) {
			continue
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err == nil && flags&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
		}
	}
}
