package launch

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/kvmscope/kvmscope/tracer/handoff"
	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Options say how to run QEMU.
type Options struct {
	// Argv is QEMU's command line: argv[0] names the binary (a path, or a
	// name looked up in PATH) and is passed to QEMU unchanged.
	Argv []string
	// Path is the binary to execute when already resolved ("" = look up
	// Argv[0]).
	Path string
	// Socket is the API socket; "" means SocketDir/NAME.sock, NAME from
	// QEMU's -name (else qemu-PID).
	Socket string
	// SocketDir holds sockets and event logs; "" means api.DefaultDir().
	SocketDir string
	// NoAPI serves no API.
	NoAPI bool
	// AllowWrite lets API clients write guest memory.
	AllowWrite bool
	// Guard protects the guest kernel's system-call dispatch from guest
	// writes once the guest has booted (KVM only), and lets API clients
	// change what the guard protects (docs/dispatch-guard.md).
	Guard bool
	// Groups may use the API besides root and our own uid.
	Groups []int
	// Watchdog restarts the analysis process when its API has not
	// answered GET /v1/health for this long; 0 never does (supervise.go).
	Watchdog time.Duration
	// EventLog also writes every log record, as JSON lines, to
	// SocketDir/NAME.log; stderr then gets only warnings and errors.
	EventLog bool
	// FailMode says what to do when the tracer cannot start.
	FailMode FailMode
	// Judging is the rule base and the schedule of the scans.
	Judging
	// Policy is the ioctl policy the tracer enforces (nil: none). The
	// caller loads it in both processes (the front checks it before
	// anything starts; the tracer enforces its own copy and hands the
	// front the seccomp filter made from it).
	Policy *policy.Policy
	// LearnTo, when set, records every ioctl QEMU makes and writes a
	// policy that allows exactly those to this file when QEMU exits.
	LearnTo string
	// Log is where records go (stderr, set up by the caller).
	Log zerolog.Logger
}

// ExitError is a failure of kvmscope itself (not QEMU's own exit status):
// Code is the exit status to return, Err says why.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string { return e.Err.Error() }
func (e *ExitError) Unwrap() error { return e.Err }

func exitErr(code int, format string, a ...any) error {
	return &ExitError{Code: code, Err: fmt.Errorf(format, a...)}
}

// Run runs QEMU under kvmscope: the calling process becomes QEMU (see
// inplace.go) and a re-executed copy of the calling binary traces it and
// serves its API until every QEMU process is gone. On success Run does not
// return in the calling process: QEMU's exit status is the process's. A
// non-nil error is an *ExitError.
//
// The binary must call Run again, with the same arguments, when it is
// re-executed as the tracer (tracerEnv set): there Run traces and serves,
// and returns when QEMU is gone.
func Run(o Options) (int, error) {
	ts, isTracer, err := takeTracerStage()
	if err != nil {
		return 1, &ExitError{1, err}
	}
	if isTracer && ts.stage == 1 {
		return runStage1(ts), nil
	}
	if len(o.Argv) == 0 {
		return 2, exitErr(2, "no QEMU command")
	}
	path := o.Path
	if path == "" {
		path, err = exec.LookPath(o.Argv[0])
		if err != nil {
			return 127, exitErr(127, "cannot run QEMU %q: %v", o.Argv[0], unwrapExecErr(err))
		}
	}
	qa := ParseQEMUArgs(o.Argv[1:])
	if qa.Name != "" {
		o.Log = o.Log.With().Str("vm", qa.Name).Logger()
	}
	if isTracer && ts.stage == analysisStage {
		return runAnalysis(o, qa, ts)
	}
	if isTracer {
		return runTracer(o, qa, ts)
	}
	if qa.Probe {
		// A probe (-version, -help, libvirt's capability probe) prints
		// and exits: it runs untraced, leaving no socket or log, and its
		// output is exactly QEMU's.
		return 127, execQEMU(path, o.Argv)
	}

	argv := append([]string(nil), o.Argv...)
	var qmpPath string
	if !o.NoAPI && (qa.MayUseTCG() || o.AllowWrite && qa.MayUseKVM()) {
		// Without KVM there are no ioctls to watch: ask QEMU itself, over
		// a private QMP socket we add to its command line. Under KVM with
		// --allow-write the same socket is the way to QEMU's gdbstub,
		// which actions inside the guest use (session/actions.go). The
		// tracer removes the directory when QEMU is gone.
		qmpDir, err := os.MkdirTemp("", "kvmscope-qmp-")
		if err != nil {
			return 1, exitErr(1, "private QMP socket: %v", err)
		}
		qmpPath = filepath.Join(qmpDir, "qmp.sock")
		argv = append(argv, "-qmp", "unix:"+qmpPath+",server=on,wait=off")
	}
	prog, err := startTracer(qmpPath)
	if err != nil {
		if qmpPath != "" {
			os.RemoveAll(filepath.Dir(qmpPath))
		}
		if o.FailMode != FailOpen {
			o.Log.Error().Err(err).Str("fail_mode", string(FailClosed)).Msg("cannot trace QEMU; not starting it untraced")
			return 1, exitErr(1, "cannot trace QEMU: %v (fail_mode closed: QEMU not started)", err)
		}
		o.Log.Warn().Err(err).Str("fail_mode", string(FailOpen)).Msg("cannot trace QEMU; starting it untraced (no introspection, no ioctl policy)")
		return 127, execQEMU(path, o.Argv)
	}
	err = tracer.ExecTraced(path, argv, prog)
	// The tracer sees us exit and goes away with us.
	return 127, exitErr(127, "%v", err)
}

// runTracer is the tracer process, the keeper: it attaches to the front
// process before that becomes QEMU, then traces QEMU until every QEMU
// process is gone. With an API it holds the API socket and runs the
// analysis process (analysis.go), which serves it; nothing here parses
// guest memory, so a crash there never takes QEMU down with the tracer.
func runTracer(o Options, qa QEMUArgs, ts tracerStage) (int, error) {
	closeInheritedFDs(ts.fd)
	if ts.qmpPath != "" {
		defer os.RemoveAll(filepath.Dir(ts.qmpPath))
	}
	serve := !o.NoAPI
	dir := socketDir(o)
	log, closeLog := processLog(o, qa, dir, serve)
	defer closeLog()

	// Forward the signals someone sends the tracer to QEMU.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	signal.Ignore(syscall.SIGPIPE)

	name := vmName(qa, ts)
	if qa.Name == "" {
		log = log.With().Str("vm", name).Logger()
	}
	var queues *handoff.Queues
	if serve {
		queues = handoff.NewQueues()
	}
	topts, logs, err := tracerOptions(o, dir, name, queues)
	if err != nil {
		reply(ts.fd, "error: "+err.Error())
		return 1, nil
	}
	defer logs.Close()
	prog, err := tracer.Filter(topts.Policy)
	if err != nil {
		reply(ts.fd, "error: "+err.Error())
		return 1, nil
	}
	t, err := tracer.Attach(ts.pid, log, topts)
	if err != nil {
		reply(ts.fd, "error: "+err.Error())
		return 1, nil
	}
	reply(ts.fd, "ok "+tracer.EncodeFilter(prog))
	log.Debug().Int("pid", ts.pid).Msg("attached; QEMU starts")

	var an *analysis // the analysis process, serving the API
	if serve {
		if sock, err := socketOf(o, dir, name); err != nil {
			log.Error().Err(err).Msg("API disabled")
		} else if ln, err := api.ListenSocket(sock, o.Groups, log); err != nil {
			log.Error().Err(err).Msg("API disabled")
		} else {
			defer ln.Close() // removes the socket
			// Register snapshots go to a board the analysis process
			// reads without asking us (tracer.RegsBoard).
			var boardFile *os.File
			if board, err := tracer.NewRegsBoard(); err != nil {
				log.Warn().Err(err).Msg("registers go through the socket")
			} else {
				defer board.Close()
				t.VM().Publish(board)
				boardFile = board.File()
			}
			an, err = startAnalysis(queues.Keeper(t), ln, boardFile, o.Watchdog, ts, log)
			if err != nil {
				log.Error().Err(err).Msg("API disabled")
			} else {
				log.Info().Str("socket", sock).Int("pid", t.Pid()).Msg("serving the VM's API")
			}
		}
	}

	forward := func(s os.Signal) {
		// SIGHUP reloads the rule file, as for a daemon (QEMU gets a
		// terminal's hangup itself, from its process group).
		if s == syscall.SIGHUP && an != nil && o.RulesPath != "" {
			an.signal(syscall.SIGHUP)
			return
		}
		log.Info().Str("signal", s.String()).Msg("forwarding signal to QEMU")
		t.Signal(s.(syscall.Signal))
	}
	for waiting := true; waiting; {
		select {
		case s := <-sigs:
			forward(s)
		case <-t.LeaderExited():
			waiting = false
		}
	}
	code := tracer.ExitCode(t.ExitStatus())
	// What the seccomp filter sent to the tracer, each a ptrace round
	// trip: the cost of the policy's rules (docs/policy.md).
	stops := zerolog.Dict()
	for cmd, n := range t.Stops() {
		stops.Uint64(ioctl.Name(cmd), n)
	}
	log.Debug().Dict("trapped_ioctls", stops).Msg("QEMU's process exited")
	// After -daemonize QEMU's first process has exited and the daemon runs
	// on: let go of the caller's stdio as the daemon does, so a caller
	// that reads until EOF does not wait for us (the analysis process
	// writes through us: analysis.go).
	if err := releaseStdio(); err != nil {
		log.Warn().Err(err).Msg("detach from the caller's stdio")
	}
	for waiting := true; waiting; {
		select {
		case s := <-sigs:
			forward(s)
		case <-t.Done():
			waiting = false
		}
	}
	if an != nil {
		// It sees QEMU gone, closes its API and drops its mappings of
		// guest RAM (memfd), which would keep the guest's memory alive.
		an.stop()
	}
	if err := t.Err(); err != nil {
		log.Error().Err(err).Msg("tracer")
	}
	if why := t.Killed(); why != "" {
		log.Error().Str("reason", why).Msg("QEMU was killed by the ioctl policy")
	}
	if topts.Learn != nil {
		// Written as the calls came (tracerOptions' Learned), while
		// QEMU waited: complete when QEMU exited, so not again here.
		log.Info().Str("file", o.LearnTo).Msg("learned policy written")
	}
	log.Info().Int("status", code).Msg("QEMU exited")
	return 0, nil
}

// socketDir is where sockets and logs go.
func socketDir(o Options) string {
	if o.SocketDir != "" {
		return o.SocketDir
	}
	return api.DefaultDir()
}

// vmName is QEMU's -name, else qemu-PID.
func vmName(qa QEMUArgs, ts tracerStage) string {
	if qa.Name != "" {
		return qa.Name
	}
	return "qemu-" + strconv.Itoa(ts.pid)
}

// processLog is where a tracer or analysis process logs: with an event
// log (Options.EventLog), every record as JSON to DIR/NAME.log and only
// warnings and errors to stderr.
func processLog(o Options, qa QEMUArgs, dir string, serve bool) (zerolog.Logger, func()) {
	log := o.Log
	if !serve || !o.EventLog || qa.Name == "" {
		return log, func() {}
	}
	f, err := openEventLog(dir, qa.Name, o.Groups)
	if err != nil {
		log.Warn().Err(err).Msg("event log disabled")
		return log, func() {}
	}
	return log.Output(zerolog.MultiLevelWriter(f,
		&zerolog.FilteredLevelWriter{Writer: zerolog.LevelWriterAdapter{Writer: os.Stderr}, Level: zerolog.WarnLevel})), func() { f.Close() }
}

// execQEMU replaces this process with QEMU, untraced. It returns only on
// failure.
func execQEMU(path string, argv []string) error {
	err := unix.Exec(path, argv, os.Environ())
	return exitErr(127, "exec %s: %v", path, err)
}

// prepareDir creates the socket directory when it is missing and we may:
// 0700, or with groups setgid 2750 owned by the first group so its members
// can reach the sockets in it. An existing directory is left as it is (it
// is the administrator's; see docs/libvirt.md).
func prepareDir(dir string, groups []int) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if len(groups) == 0 {
		return os.MkdirAll(dir, 0o700)
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create %s: %w (create it at install, see docs/libvirt.md)", dir, err)
	}
	if err := os.Chown(dir, -1, groups[0]); err != nil {
		return fmt.Errorf("give %s to group %d: %w", dir, groups[0], err)
	}
	return os.Chmod(dir, 0o2750)
}

// releaseStdio points fds 0-2 at /dev/null. Records still reach the event
// log when there is one.
func releaseStdio() error {
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer null.Close()
	for fd := 0; fd <= 2; fd++ {
		if err := unix.Dup3(int(null.Fd()), fd, 0); err != nil {
			return fmt.Errorf("dup3 onto fd %d: %w", fd, err)
		}
	}
	return nil
}

// openEventLog opens DIR/NAME.log for appending: 0640, readable by the
// directory's group.
func openEventLog(dir, name string, groups []int) (*os.File, error) {
	if err := prepareDir(dir, groups); err != nil {
		return nil, err
	}
	p := filepath.Join(dir, FileName(name)+".log")
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_NOFOLLOW, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open event log: %w", err)
	}
	return f, nil
}

func unwrapExecErr(err error) error {
	var ee *exec.Error
	if errors.As(err, &ee) {
		return ee.Err
	}
	return err
}
