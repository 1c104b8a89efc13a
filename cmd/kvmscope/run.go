package main

import (
	"context"
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
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:      "run",
		Usage:     "launch QEMU under kvmscope and serve the VM's API",
		ArgsUsage: "-- QEMU_BINARY [QEMU ARGS...]",
		Description: "QEMU runs exactly as it would without kvmscope: same argv, environment,\n" +
			"cwd, stdio and inherited fds; its exit status becomes kvmscope's.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "api", Usage: "API socket path (default: $XDG_RUNTIME_DIR/kvmscope/NAME.sock or /run/kvmscope/NAME.sock, NAME from QEMU's -name, else qemu-PID)"},
			&cli.BoolFlag{Name: "no-api", Usage: "do not serve the API"},
			&cli.BoolFlag{Name: "allow-write", Usage: "allow writes to guest memory through the API"},
			&cli.StringFlag{Name: "detached-status-fd", Hidden: true},
		},
		Action: runAction,
	}
}

func runAction(c *cli.Context) error {
	args := c.Args().Slice()
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		return cli.Exit("run needs a QEMU command: kvmscope run -- qemu-system-x86_64 ARGS...", 2)
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		return cli.Exit(fmt.Sprintf("cannot run QEMU %q: %v", args[0], unwrapExecErr(err)), 127)
	}
	qa := parseQEMUArgs(args[1:])
	if qa.daemonize && c.String("detached-status-fd") == "" {
		return runDetached(c, args)
	}
	statusFD := -1
	if s := c.String("detached-status-fd"); s != "" {
		statusFD, err = strconv.Atoi(s)
		if err != nil {
			return cli.Exit("bad --detached-status-fd", 2)
		}
		// Ours only: QEMU must not inherit it.
		unix.CloseOnExec(statusFD)
	}

	serve := !c.Bool("no-api") && !qa.probe
	argv := append([]string(nil), args...)
	var qmpPath, qmpDir string
	if serve && qa.mayUseTCG() {
		// Without KVM there are no ioctls to watch: ask QEMU itself, over
		// a private QMP socket we add to its command line.
		qmpDir, err = os.MkdirTemp("", "kvmscope-qmp-")
		if err != nil {
			return cli.Exit(fmt.Sprintf("private QMP socket: %v", err), 1)
		}
		defer os.RemoveAll(qmpDir)
		qmpPath = filepath.Join(qmpDir, "qmp.sock")
		argv = append(argv, "-qmp", "unix:"+qmpPath+",server=on,wait=off")
	}

	// Forward the signals a service manager or a terminal sends us.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	signal.Ignore(syscall.SIGPIPE)

	t, err := tracer.Start(tracer.Config{Path: path, Argv: argv, Log: log})
	if err != nil {
		return cli.Exit(err.Error(), 1)
	}

	var server *api.Server
	if serve {
		target := newRunTarget(t, qa, c.Bool("allow-write"), qmpPath)
		sock := c.String("api")
		if sock == "" {
			name := qa.name
			if name == "" {
				name = "qemu-" + strconv.Itoa(t.Pid())
			}
			sock = api.DefaultSocket(name)
		}
		target.name = qa.name
		server = &api.Server{Target: target, Log: log}
		if err := server.Listen(sock); err != nil {
			log.Error().Err(err).Msg("API disabled")
			server = nil
		} else {
			log.Info().Str("socket", sock).Int("pid", t.Pid()).Msg("serving the VM's API")
		}
		go target.connectQMP(t.Done())
	}

	for {
		select {
		case s := <-sigs:
			log.Info().Str("signal", s.String()).Msg("forwarding signal to QEMU")
			t.Signal(s.(syscall.Signal))
			continue
		case <-t.LeaderExited():
		}
		break
	}
	code := tracer.ExitCode(t.ExitStatus())
	if statusFD >= 0 {
		// Detached tracer: the front process returns QEMU's first process's
		// status to its caller now, as QEMU's own -daemonize does; we stay
		// and keep tracing the daemon.
		f := os.NewFile(uintptr(statusFD), "status")
		fmt.Fprintf(f, "%d\n", code)
		f.Close()
		for {
			select {
			case s := <-sigs:
				t.Signal(s.(syscall.Signal))
				continue
			case <-t.Done():
			}
			break
		}
	}
	<-t.Done()
	if server != nil {
		server.Close()
	}
	if err := t.Err(); err != nil {
		log.Error().Err(err).Msg("tracer")
	}
	if code != 0 {
		return cli.Exit("", code)
	}
	return nil
}

func unwrapExecErr(err error) error {
	var ee *exec.Error
	if errors.As(err, &ee) {
		return ee.Err
	}
	return err
}

// runTarget is the api.Target of a VM launched by `kvmscope run`.
type runTarget struct {
	t        *tracer.Tracer
	qa       qemuArgs
	name     string
	writable bool
	live     *guestmem.Live
	qmpPath  string
	tcg      *guestmem.TCG // set once QMP answers and QEMU created no KVM VM
	tcgReady chan struct{}
}

func newRunTarget(t *tracer.Tracer, qa qemuArgs, writable bool, qmpPath string) *runTarget {
	return &runTarget{t: t, qa: qa, writable: writable, live: guestmem.NewLive(t.VM(), writable), qmpPath: qmpPath, tcgReady: make(chan struct{})}
}

// connectQMP connects to the private QMP socket when QEMU has one.
func (r *runTarget) connectQMP(done <-chan struct{}) {
	if r.qmpPath == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-done:
			cancel()
		case <-ctx.Done():
		}
	}()
	q, err := guestmem.DialQMP(ctx, r.qmpPath)
	if err != nil {
		log.Warn().Err(err).Msg("private QMP socket")
		return
	}
	r.tcg = guestmem.NewTCG(q, r.t.QEMUPid, r.writable)
	close(r.tcgReady)
}

// kvm reports whether QEMU runs the guest on KVM.
func (r *runTarget) kvm() bool { return r.t.VM().Pid() != 0 }

func (r *runTarget) Source() guestmem.Source {
	if r.kvm() {
		return r.live
	}
	select {
	case <-r.tcgReady:
		return r.tcg
	default:
		return notReady{}
	}
}

func (r *runTarget) Describe() api.VM {
	out := api.VM{Name: r.name, Accel: "tcg", Writable: r.writable, VCPUs: []api.VCPUInfo{}, Regions: []api.RegionOut{}}
	vm := r.t.VM()
	if r.kvm() {
		out.Accel = "kvm"
		out.Pid = vm.Pid()
		for _, v := range vm.VCPUs() {
			out.VCPUs = append(out.VCPUs, api.VCPUInfo{ID: v.ID, TID: v.TID})
		}
		for _, m := range vm.Memslots() {
			out.Memslots = append(out.Memslots, api.Memslot{Slot: m.Slot, AddressSpace: m.AddressSpace(), GPA: api.Hex64(m.GPA), Size: api.Hex64(m.Size), HVA: api.Hex64(m.HVA), Flags: m.Flags, ReadOnly: m.ReadOnly, DirtyLog: m.DirtyLog})
		}
	} else {
		out.Pid = r.t.QEMUPid()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if cpus, err := r.Source().CPUs(ctx); err == nil {
			for _, c := range cpus {
				out.VCPUs = append(out.VCPUs, api.VCPUInfo{ID: c.ID})
			}
		}
	}
	for _, rg := range r.Source().Regions() {
		out.Regions = append(out.Regions, api.RegionOut{GPA: api.Hex64(rg.GPA), Size: api.Hex64(rg.Size), ReadOnly: rg.ReadOnly, Name: rg.Name})
	}
	return out
}

// notReady is the source before QEMU has created its VM or answered QMP.
type notReady struct{}

var errNotReady = errors.New("the VM is not running yet (QEMU has created no VM and its QMP socket is not answering)")

func (notReady) ReadAt([]byte, int64) (int, error)            { return 0, errNotReady }
func (notReady) Regions() []guestmem.Region                   { return nil }
func (notReady) CPUs(context.Context) ([]guestmem.CPU, error) { return nil, errNotReady }
