//go:build linux && amd64

package launch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/tracer/handoff"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// analysisStage is the tracer stage of the analysis process (tracerEnv).
const analysisStage = 3

// The fds an analysis process is started with.
const (
	analysisConnFD  = 3 // its end of the socket to the keeper
	analysisAPIFD   = 4 // the API socket's listener, which the keeper keeps
	analysisBoardFD = 5 // the register board (tracer.RegsBoard), when there is one
)

// DefaultWatchdog is how long an analysis process may leave GET
// /v1/health unanswered before the keeper kills and replaces it: long
// enough for a loaded host to answer a health check, short enough that
// clients and pauses it holds do not wait for an operator.
const DefaultWatchdog = 30 * time.Second

// CheckWatchdog says whether d can be a watchdog bound: 0 (none) or at
// least a second (a probe every third of it must have time to answer).
func CheckWatchdog(d time.Duration) error {
	if d != 0 && d < time.Second {
		return fmt.Errorf("%v: want 0 (no watchdog) or at least 1s", d)
	}
	return nil
}

// analysis runs the analysis process for the keeper, and a new one each
// time one dies while QEMU runs.
type analysis struct {
	k     *handoff.Keeper
	ln    *os.File
	sock  string        // the API socket's path, for the watchdog's probes
	dog   time.Duration // the watchdog's bound (0: no watchdog)
	board *os.File      // nil: registers go through the socket
	ts    tracerStage
	log   zerolog.Logger

	mu       sync.Mutex
	pidfd    int // the running one's, -1 between two
	stopping bool
	done     chan struct{} // closed when the last one has exited
}

// startAnalysis starts the analysis process, which serves the API on ln
// and reads registers from board (nil: through the socket), and a new one
// when it dies or has not answered for watchdog (0: only when it dies).
func startAnalysis(k *handoff.Keeper, ln net.Listener, board *os.File, watchdog time.Duration, ts tracerStage, log zerolog.Logger) (*analysis, error) {
	ul, ok := ln.(*net.UnixListener)
	if !ok {
		return nil, fmt.Errorf("API socket: %T is not a unix listener", ln)
	}
	f, err := ul.File()
	if err != nil {
		return nil, fmt.Errorf("API socket: %w", err)
	}
	a := &analysis{k: k, ln: f, sock: ul.Addr().String(), dog: watchdog, board: board, ts: ts, log: log, pidfd: -1, done: make(chan struct{})}
	started := make(chan error, 1)
	go a.supervise(started)
	return a, <-started
}

// supervise starts analysis processes until stop.
func (a *analysis) supervise(started chan<- error) {
	defer close(a.done)
	backoff := 100 * time.Millisecond
	for first := true; ; first = false {
		at := time.Now()
		pid, pidfd, err := a.start()
		if first {
			started <- err
		}
		if err != nil {
			if !first {
				a.log.Error().Err(err).Msg("cannot start a new analysis process; the API stays down")
			}
			return
		}
		exited := make(chan struct{})
		hung := make(chan time.Duration, 1)
		if a.dog > 0 {
			go a.watch(pid, pidfd, exited, hung)
		}
		waitExit(pidfd)
		close(exited)
		a.mu.Lock()
		unix.Close(pidfd)
		a.pidfd = -1
		stopping := a.stopping
		a.mu.Unlock()
		if stopping {
			return
		}
		// Died while QEMU runs: a bug, a guest that broke a parser, the
		// OOM killer, or the watchdog. QEMU and its trace do not notice;
		// start another.
		if time.Since(at) > time.Minute {
			backoff = 100 * time.Millisecond
		}
		reason, ev := "died", map[string]any{"pid": pid, "ran_ns": time.Since(at).Nanoseconds()}
		select {
		case silent := <-hung:
			reason, ev["silent_ns"] = "hung", silent.Nanoseconds()
		default:
		}
		ev["reason"] = reason
		a.k.Append("analysis_restart", ev)
		a.log.Error().Int("pid", pid).Str("reason", reason).Dur("restart_in", backoff).Msg("the analysis process died; QEMU runs on, starting a new one")
		time.Sleep(backoff)
		backoff = min(2*backoff, 5*time.Second)
		a.mu.Lock()
		stopping = a.stopping
		a.mu.Unlock()
		if stopping {
			return
		}
	}
}

// waitExit waits until the process of pidfd has exited (its pidfd polls
// readable).
func waitExit(pidfd int) {
	for {
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n > 0 {
			return
		}
	}
}

// start starts one analysis process, serves it, and returns its pid and
// pidfd.
//
// It is our sibling, not our child (CLONE_PARENT): the tracer waits for
// every child of this process (wait4(-1, __WALL)) and takes their exits
// for QEMU's; like the tracer itself it must be nobody's child here.
func (a *analysis) start() (int, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, -1, fmt.Errorf("analysis socket: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "keeper")
	theirs := os.NewFile(uintptr(fds[1]), "analysis")
	defer theirs.Close()
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return 0, -1, fmt.Errorf("analysis socket: %w", err)
	}
	// Its output goes through us, not to our stderr's file: when QEMU
	// daemonizes we let go of the caller's stdio (releaseStdio), and so
	// must what the analysis process writes.
	pr, pw, err := os.Pipe()
	if err != nil {
		conn.Close()
		return 0, -1, fmt.Errorf("analysis output: %w", err)
	}
	defer pw.Close()
	go func() {
		io.Copy(os.Stderr, pr)
		pr.Close()
	}()
	st := a.ts
	st.fd = analysisConnFD
	files := []uintptr{devNull(), pw.Fd(), pw.Fd(), theirs.Fd(), a.ln.Fd()} // fds 0-4
	if a.board != nil {
		files = append(files, a.board.Fd()) // fd 5
	}
	pid, err := syscall.ForkExec(self(), os.Args, &syscall.ProcAttr{
		Env:   append(os.Environ(), st.env(analysisStage)),
		Files: files,
		Sys:   &syscall.SysProcAttr{Cloneflags: unix.CLONE_PARENT},
	})
	if err != nil {
		conn.Close()
		return 0, -1, fmt.Errorf("start the analysis process: %w", err)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		syscall.Kill(pid, syscall.SIGKILL)
		conn.Close()
		return 0, -1, fmt.Errorf("analysis process: pidfd_open: %w", err)
	}
	a.mu.Lock()
	a.pidfd = pidfd
	a.mu.Unlock()
	a.log.Debug().Int("pid", pid).Msg("analysis process started")
	go func() {
		a.k.Serve(conn)
		conn.Close()
	}()
	return pid, pidfd, nil
}

// watch is the watchdog of analysis process pid (pidfd) until exited: it
// asks the API socket for GET /v1/health every a.dog/3, and when no answer
// has come for a.dog it says so on hung and kills the process, which
// supervise then replaces. A process that cannot answer (stopped, stuck in
// the kernel, starved, deadlocked in its server) serves no client, and
// the pauses of QEMU it holds are released only when its socket to us
// closes. A probe that cannot reach the socket at all (its file removed
// or taken by another listener) proves nothing about the process and is
// not counted.
func (a *analysis) watch(pid, pidfd int, exited <-chan struct{}, hung chan<- time.Duration) {
	every := a.dog / 3 // CheckWatchdog: at least 333 ms
	probe := healthProbe(a.sock, every)
	answered := time.Now()
	unreachable := false
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-exited:
			return
		case <-tick.C:
		}
		err := probe(pid)
		switch {
		case err == nil:
			answered, unreachable = time.Now(), false
		case errors.Is(err, errUnreachable):
			if !unreachable {
				a.log.Warn().Err(err).Msg("watchdog: cannot reach the API socket; not judging the analysis process until it can")
			}
			answered, unreachable = time.Now(), true
		case time.Since(answered) >= a.dog:
			silent := time.Since(answered)
			a.log.Error().Int("pid", pid).Dur("silent", silent).Err(err).Msg("watchdog: the analysis process has not answered; killing it")
			hung <- silent
			unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
			return
		default:
			a.log.Debug().Err(err).Msg("watchdog: no answer yet")
		}
	}
}

// errUnreachable: the probe found nobody listening at the socket's path.
var errUnreachable = errors.New("nobody listens at the API socket's path")

// healthProbe returns a probe of the API at sock: GET /v1/health,
// answered within timeout by process pid.
func healthProbe(sock string, timeout time.Duration) func(pid int) error {
	c := api.NewClient(sock).WithTimeout(timeout)
	return func(pid int) error {
		var h api.Health
		err := c.Get(context.Background(), "/v1/health", &h)
		switch {
		// No listener bound at the path. (A full backlog, EAGAIN, is a
		// process that does not accept.)
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ECONNREFUSED):
			return fmt.Errorf("%w: %v", errUnreachable, err)
		case err != nil:
			return err
		case h.Pid != pid:
			// Another process answering at our path is not ours to judge.
			return fmt.Errorf("%w: pid %d answers, not %d", errUnreachable, h.Pid, pid)
		case !h.OK:
			return errors.New("GET /v1/health: not ok")
		}
		return nil
	}
}

// signal sends sig to the running analysis process.
func (a *analysis) signal(sig syscall.Signal) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.pidfd >= 0 {
		unix.PidfdSendSignal(a.pidfd, sig, nil, 0)
	}
}

// stop ends the analysis once QEMU is gone: the process sees it and exits
// (within seconds, or it is killed).
func (a *analysis) stop() {
	a.mu.Lock()
	a.stopping = true
	a.mu.Unlock()
	select {
	case <-a.done:
	case <-time.After(5 * time.Second):
		a.log.Warn().Msg("the analysis process did not exit with QEMU; killing it")
		a.signal(syscall.SIGKILL)
		<-a.done
	}
	a.ln.Close()
}
