// Command kvmscope-qemu is QEMU as libvirt sees it: a domain's <emulator>
// that takes QEMU's own arguments and runs the real QEMU under kvmscope's
// tracer, as `kvmscope run -- REAL_QEMU ARGS...` would, serving the VM's API
// on SOCKET_DIR/NAME.sock (NAME from -name guest=NAME).
//
// The real QEMU is $KVMSCOPE_QEMU, else `qemu` in /etc/kvmscope/config.yaml
// ($KVMSCOPE_CONFIG names another file), else the usual install paths.
// Probe runs (-version, -help, libvirt's "-machine none" capability probe)
// execute the real QEMU directly. See docs/libvirt.md.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/rules"
	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"github.com/rs/zerolog"
	"golang.org/x/term"
)

func init() {
	// The in-place launch (launch.Run) executes QEMU from the main
	// goroutine, which must be on the main thread, the thread-group leader
	// the tracer seizes; locking in init pins it there before main starts.
	runtime.LockOSThread()
}

func main() {
	// Stay on the main thread: kvmscope run ends by executing QEMU from
	// this goroutine, and the tracer has seized this thread (the
	// thread-group leader) only.
	os.Exit(run(os.Args[1:]))
}

func fail(code int, err error) int {
	fmt.Fprintf(os.Stderr, "kvmscope-qemu: %v\n", err)
	return code
}

func run(args []string) int {
	cfg, err := launch.LoadConfig(launch.ConfigPath())
	if err != nil {
		return fail(1, err)
	}
	self, _ := os.Executable()
	qemu, err := launch.FindQEMU(cfg, self)
	if err != nil {
		return fail(127, err)
	}
	log, err := newLogger(cfg)
	if err != nil {
		return fail(1, err)
	}
	groups, err := cfg.Groups()
	if err != nil {
		log.Warn().Err(err).Msg("no group may use the API besides root and QEMU's user")
	}
	pol, err := policy.Named(cfg.PolicyFile())
	if err != nil {
		// An invalid policy refuses to start the VM.
		return fail(2, err)
	}
	// The rule base: the VM's own file, or the config's; an invalid one
	// refuses to start the VM, as an invalid policy does.
	rulesPath := cfg.RulesFile(launch.ParseQEMUArgs(args).Name)
	var set *rules.Set
	scan := session.DefaultScan
	scan.Interval = cfg.ScanInterval
	if rulesPath != "" {
		if set, err = rules.Load(rulesPath); err != nil {
			return fail(2, err)
		}
		// The config's scan_interval wins over the rule file's.
		scan.ApplyScanSection(set.Scan, func(key string) bool { return key == "interval" && cfg.ScanInterval != 0 })
	}
	if scan.Interval > 0 {
		if err := scan.Check(); err != nil {
			return fail(2, fmt.Errorf("%s: scan: %w", rulesPath, err))
		}
	}
	code, err := launch.Run(launch.Options{
		Argv:       append([]string{qemu}, args...),
		Path:       qemu,
		SocketDir:  cfg.SocketDir,
		AllowWrite: cfg.AllowWrite,
		Guard:      cfg.Guard,
		Groups:     groups,
		Watchdog:   *cfg.Watchdog,
		EventLog:   *cfg.EventLog,
		FailMode:   cfg.FailMode,
		Policy:     pol,
		Judging:    launch.Judging{Rules: set, RulesPath: rulesPath, Scan: scan},
		Log:        log,
	})
	var ee *launch.ExitError
	if errors.As(err, &ee) {
		return fail(ee.Code, ee)
	}
	return code
}

// newLogger logs to stderr, which libvirt keeps in the domain log: JSON
// lines unless stderr is a terminal. KVMSCOPE_LOG_LEVEL overrides the
// config's log_level.
func newLogger(cfg launch.Config) (zerolog.Logger, error) {
	lv := cfg.LogLevel
	if s := os.Getenv("KVMSCOPE_LOG_LEVEL"); s != "" {
		lv = s
	}
	level, err := zerolog.ParseLevel(lv)
	if err != nil || lv == "" {
		return zerolog.Logger{}, fmt.Errorf("bad log level %q: want debug, info, warn or error", lv)
	}
	var log zerolog.Logger
	if term.IsTerminal(int(os.Stderr.Fd())) {
		log = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly})
	} else {
		log = zerolog.New(os.Stderr)
	}
	return log.With().Timestamp().Str("component", "kvmscope").Logger().Level(level), nil
}
