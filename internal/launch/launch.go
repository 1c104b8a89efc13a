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
	// Groups may use the API besides root and our own uid.
	Groups []int
	// EventLog also writes every log record, as JSON lines, to
	// SocketDir/NAME.log; stderr then gets only warnings and errors.
	EventLog bool
	// FailMode says what to do when the tracer cannot start.
	FailMode FailMode
	// PassProbes executes probe runs (-version, -help, -machine none)
	// directly, untraced: no tracer, no socket, no log.
	PassProbes bool
	// ScanInterval, when positive, scans the guest's processes on that
	// interval, keeping the latest table for the API.
	ScanInterval time.Duration
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

// Run runs QEMU under the tracer and serves its API until every QEMU
// process is gone. It returns QEMU's exit status as a shell would see it
// (128+N when killed by signal N). A non-nil error is an *ExitError.
//
// With -daemonize it returns as QEMU's own first process would, while a
// detached copy of the calling binary keeps tracing the daemon (the binary
// must call Run again, with the same arguments, when re-executed).
func Run(o Options) (int, error) {
	statusFD, err := takeDetachedStatusFD()
	if err != nil {
		return 1, &ExitError{1, err}
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
	if qa.Probe {
		// A probe (-version, -help) prints and exits: its output must be
		// exactly QEMU's, so say nothing unless something goes wrong.
		o.Log = o.Log.Level(zerolog.WarnLevel)
	}
	if qa.Probe && o.PassProbes {
		return 127, execQEMU(path, o.Argv)
	}
	if qa.Daemonize && statusFD < 0 {
		code, untraced, err := runDetached()
		if err != nil {
			return 1, &ExitError{1, err}
		}
		if untraced {
			// The detached tracer has logged why; fail-open.
			return 127, execQEMU(path, o.Argv)
		}
		return code, nil
	}

	log := o.Log
	serve := !o.NoAPI && !qa.Probe
	dir := o.SocketDir
	if dir == "" {
		dir = api.DefaultDir()
	}
	if qa.Name != "" {
		log = log.With().Str("vm", qa.Name).Logger()
	}
	if serve && o.EventLog && qa.Name != "" {
		if f, err := openEventLog(dir, qa.Name, o.Groups); err != nil {
			log.Warn().Err(err).Msg("event log disabled")
		} else {
			defer f.Close()
			log = log.Output(zerolog.MultiLevelWriter(f,
				&zerolog.FilteredLevelWriter{Writer: zerolog.LevelWriterAdapter{Writer: os.Stderr}, Level: zerolog.WarnLevel}))
		}
	}

	argv := append([]string(nil), o.Argv...)
	var qmpPath string
	if serve && qa.MayUseTCG() {
		// Without KVM there are no ioctls to watch: ask QEMU itself, over
		// a private QMP socket we add to its command line.
		qmpDir, err := os.MkdirTemp("", "kvmscope-qmp-")
		if err != nil {
			return 1, exitErr(1, "private QMP socket: %v", err)
		}
		defer os.RemoveAll(qmpDir)
		qmpPath = filepath.Join(qmpDir, "qmp.sock")
		argv = append(argv, "-qmp", "unix:"+qmpPath+",server=on,wait=off")
	}

	// Forward the signals a service manager, libvirt or a terminal sends us.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	signal.Ignore(syscall.SIGPIPE)

	t, err := tracer.Start(tracer.Config{Path: path, Argv: argv, Log: log})
	if err != nil {
		if o.FailMode != FailOpen {
			if statusFD >= 0 {
				reportStatus(statusFD, "1")
			}
			log.Error().Err(err).Str("fail_mode", string(FailClosed)).Msg("cannot trace QEMU; not starting it untraced")
			return 1, exitErr(1, "cannot trace QEMU: %v (fail_mode closed: QEMU not started)", err)
		}
		log.Warn().Err(err).Str("fail_mode", string(FailOpen)).Msg("cannot trace QEMU; starting it untraced (no introspection, no ioctl policy)")
		signal.Reset(syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGPIPE)
		if statusFD >= 0 {
			// The front process, still the caller's child, runs QEMU.
			reportStatus(statusFD, statusUntraced)
			return 0, nil
		}
		return 127, execQEMU(path, o.Argv)
	}

	name := qa.Name
	if name == "" {
		name = "qemu-" + strconv.Itoa(t.Pid())
		log = log.With().Str("vm", name).Logger()
	}
	var server *api.Server
	if serve {
		target := newRunTarget(t, qa, o.AllowWrite, qmpPath, log)
		target.name = qa.Name
		sock := o.Socket
		if sock == "" {
			sock = filepath.Join(dir, FileName(name)+".sock")
			if err := prepareDir(dir, o.Groups); err != nil {
				log.Warn().Err(err).Msg("socket directory")
			}
		}
		metrics := api.NewMetrics()
		target.metrics = metrics
		server = &api.Server{Target: target, Log: log, Groups: o.Groups, Scanner: newScanner(target), Metrics: metrics}
		server.Scanner.OnScan = func(d time.Duration, err error) { metrics.ObserveScan("processes", d, err) }
		if o.ScanInterval > 0 {
			startScans(target, server.Scanner, o.ScanInterval, t.Done())
		}
		if err := server.Listen(sock); err != nil {
			log.Error().Err(err).Msg("API disabled")
			server = nil
		} else {
			log.Info().Str("socket", sock).Int("pid", t.Pid()).Msg("serving the VM's API")
		}
		go target.connectQMP(t.Done())
	}

	forward := func(s os.Signal) {
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
	if statusFD >= 0 {
		// Detached tracer: the front process returns QEMU's first process's
		// status to its caller now, as QEMU's own -daemonize does; we stay
		// and keep tracing the daemon.
		reportStatus(statusFD, strconv.Itoa(code))
		// Let go of the caller's stdio as QEMU's daemon does: a caller
		// that reads QEMU's output until EOF must not wait for us.
		if err := releaseStdio(); err != nil {
			log.Warn().Err(err).Msg("detach from the caller's stdio")
		}
	}
	for waiting := true; waiting; {
		select {
		case s := <-sigs:
			forward(s)
		case <-t.Done():
			waiting = false
		}
	}
	if server != nil {
		server.Close()
	}
	if err := t.Err(); err != nil {
		log.Error().Err(err).Msg("tracer")
	}
	log.Info().Int("status", code).Msg("QEMU exited")
	return code, nil
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
