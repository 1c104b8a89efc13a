package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testenv"
)

// The tests here run the real kvmscope-qemu and kvmscope binaries against
// real QEMU, and against a real libvirtd in libvirt_test.go.

var (
	binDir      string // world-readable: libvirt runs the wrapper as libvirt-qemu
	wrapperBin  string // kvmscope-qemu
	kvmscopeBin string // the CLI
)

func TestMain(m *testing.M) {
	if os.Getenv(denyPtraceEnv) == "1" {
		denyPtraceAndExec(os.Args[1:]) // never returns
	}
	dir, err := os.MkdirTemp("", "kvmscope-qemu-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	binDir = dir
	wrapperBin = filepath.Join(dir, "kvmscope-qemu")
	kvmscopeBin = filepath.Join(dir, "kvmscope")
	if lab := os.Getenv("KVMSCOPE_BIN_DIR"); lab != "" {
		// Inside the nested-KVM lab, which has no Go: built beforehand.
		wrapperBin = filepath.Join(lab, "kvmscope-qemu")
		kvmscopeBin = filepath.Join(lab, "kvmscope")
	} else {
		for bin, pkg := range map[string]string{wrapperBin: ".", kvmscopeBin: "../kvmscope"} {
			if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
				fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, out)
				os.Exit(1)
			}
		}
	}
	code := m.Run()
	stopStartedDaemons()
	forgetCapabilities(wrapperBin)
	os.RemoveAll(dir)
	os.Exit(code)
}

// needQEMU skips when qemu-system-x86_64 is not installed.
func needQEMU(t *testing.T) string {
	t.Helper()
	testenv.Require(t, testenv.QEMU)
	p, _ := exec.LookPath("qemu-system-x86_64")
	return p
}

// result is a finished command.
type result struct {
	stdout, stderr string
	code           int
	took           time.Duration
}

// runCmd runs cmd to completion within timeout.
func runCmd(t *testing.T, cmd *exec.Cmd, timeout time.Duration) result {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(timeout):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%v did not finish within %v\nstderr: %s", cmd.Args, timeout, errb.String())
	}
	r := result{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return r
}

// wrapperCmd is kvmscope-qemu ARGS with a config file of ours.
func wrapperCmd(config string, args ...string) *exec.Cmd {
	cmd := exec.Command(wrapperBin, args...)
	cmd.Env = append(os.Environ(), "KVMSCOPE_CONFIG="+config)
	return cmd
}

// writeConfig writes a config file in a fresh directory and returns its
// path and the socket directory it names.
func writeConfig(t *testing.T, extra string) (config, sockDir string) {
	t.Helper()
	dir := t.TempDir()
	sockDir = filepath.Join(dir, "run")
	config = filepath.Join(dir, "config.yaml")
	body := fmt.Sprintf("socket_dir: %s\ngroup: \"\"\n%s", sockDir, extra)
	if err := os.WriteFile(config, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return config, sockDir
}

func procStatus(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	return string(b)
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || len(b) < i+3 || b[i+2] != 'Z'
}

func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestProbesPassThrough: -version, -help and libvirt's capability probe run
// the real QEMU directly: same output, fast, nothing left behind.
func TestProbesPassThrough(t *testing.T) {
	qemu := needQEMU(t)
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\n")
	for _, args := range [][]string{{"-version"}, {"-machine", "help"}, {"-device", "help"}} {
		want, err := exec.Command(qemu, args...).Output()
		if err != nil {
			t.Fatal(err)
		}
		r := runCmd(t, wrapperCmd(config, args...), 20*time.Second)
		if r.code != 0 || r.stdout != string(want) || r.stderr != "" {
			t.Errorf("kvmscope-qemu %v: code %d, stderr %q, stdout differs from QEMU's: %v", args, r.code, r.stderr, r.stdout != string(want))
		}
		t.Logf("kvmscope-qemu %v: %v", args, r.took)
	}

	// libvirt's probe (host-facts): QMP, pid file, -daemonize.
	dir := t.TempDir()
	pidfile := filepath.Join(dir, "qemu.pid")
	qmp := filepath.Join(dir, "qmp.sock")
	r := runCmd(t, wrapperCmd(config, "-S", "-no-user-config", "-nodefaults", "-nographic",
		"-machine", "none,accel=kvm:tcg", "-qmp", "unix:"+qmp+",server=on,wait=off",
		"-pidfile", pidfile, "-daemonize"), 20*time.Second)
	if r.code != 0 {
		t.Fatalf("capability probe: code %d, stderr %q", r.code, r.stderr)
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	defer func() {
		if pid > 0 {
			exec.Command("kill", "-9", fmt.Sprint(pid)).Run()
		}
	}()
	st := procStatus(pid)
	if !strings.Contains(st, "TracerPid:\t0\n") {
		t.Errorf("the probe's QEMU daemon %d is traced; probes must pass straight through", pid)
	}
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); exe != qemu {
		t.Errorf("probe daemon runs %q, want %q", exe, qemu)
	}
	if _, err := os.Stat(qmp); err != nil {
		t.Errorf("the probe's QMP socket is missing: %v", err)
	}
	if names := dirEntries(t, sockDir); len(names) != 0 {
		t.Errorf("a probe left %v in the socket directory", names)
	}
	t.Logf("capability probe: %v", r.took)
}

// tcgArgs is a small TCG VM that runs until killed (no guest code needed:
// -S keeps the vCPU stopped, yet QEMU has its RAM and QMP).
func tcgArgs(name string) []string {
	return []string{"-name", "guest=" + name + ",debug-threads=on", "-accel", "tcg", "-M", "pc", "-m", "64",
		"-nodefaults", "-display", "none", "-S"}
}

// TestWrapperServesAPI: outside libvirt, kvmscope-qemu with a config file
// serves the API, the event log and /metrics under the configured
// directory, and finds the real QEMU from the config.
func TestWrapperServesAPI(t *testing.T) {
	qemu := needQEMU(t)
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\nlog_level: debug\n")
	cmd := wrapperCmd(config, tcgArgs("wrapped")...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
		}
	}()
	sock := filepath.Join(sockDir, "wrapped.sock")
	waitFile(t, sock, 20*time.Second)

	// Under TCG the vCPUs come from QEMU's QMP, which answers a moment
	// after the socket appears.
	waitVCPUs(t, sock, 1)
	r := runCmd(t, exec.Command(kvmscopeBin, "vm", "--api", sock, "--json"), 20*time.Second)
	if r.code != 0 || !strings.Contains(r.stdout, `"name": "wrapped"`) || !strings.Contains(r.stdout, `"accel": "tcg"`) {
		t.Fatalf("kvmscope vm: code %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// --vm NAME finds the socket through the same config file.
	vmcmd := exec.Command(kvmscopeBin, "vm", "--vm", "wrapped", "--json")
	vmcmd.Env = append(os.Environ(), "KVMSCOPE_CONFIG="+config)
	if r := runCmd(t, vmcmd, 20*time.Second); r.code != 0 || !strings.Contains(r.stdout, `"name": "wrapped"`) {
		t.Errorf("kvmscope vm --vm wrapped with KVMSCOPE_CONFIG: code %d %s", r.code, r.stderr)
	}
	metrics := getMetrics(t, sock)
	for _, want := range []string{"kvmscope_vcpus 1", `kvmscope_api_requests_total{code="200",path="/v1/vm"}`, "kvmscope_memslots 0",
		"kvmscope_guest_memory_read_bytes_total", "kvmscope_api_request_duration_seconds_bucket"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, metrics)
		}
	}
	// The event log has the VM's records, each naming the VM.
	checkEventLog(t, filepath.Join(sockDir, "wrapped.log"), "wrapped")
	if strings.Contains(stderr.String(), `"level":"info"`) {
		t.Errorf("info records went to stderr (the libvirt domain log); want only warnings and errors there:\n%s", stderr.String())
	}
}

func waitFile(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within %v", path, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkEventLog checks that the event log at path holds JSON records, each
// with "vm":name, and no error records.
func checkEventLog(t *testing.T, path, name string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("event log: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) == 0 || lines[0] == "" {
		t.Fatalf("event log %s is empty", path)
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "{") || !strings.Contains(l, `"vm":"`+name+`"`) {
			t.Errorf("event log record without the VM's name: %s", l)
		}
		if strings.Contains(l, `"level":"error"`) {
			t.Errorf("event log has an error: %s", l)
		}
	}
}

// waitVCPUs waits until the API at sock reports n vCPUs.
func waitVCPUs(t *testing.T, sock string, n int) api.VM {
	t.Helper()
	c := api.NewClient(sock)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var vm api.VM
		err := c.Get(ctx, "/v1/vm", &vm)
		cancel()
		if err == nil && len(vm.VCPUs) == n {
			return vm
		}
		if time.Now().After(deadline) {
			t.Fatalf("API %s: want %d vCPUs, got %+v, %v", sock, n, vm, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestWrapperDaemonize: a VM started through the wrapper with -daemonize
// (not a probe) returns when QEMU's first process does, and its daemon
// stays traced and served.
func TestWrapperDaemonize(t *testing.T) {
	qemu := needQEMU(t)
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\n")
	pidfile := filepath.Join(t.TempDir(), "qemu.pid")
	r := runCmd(t, wrapperCmd(config, append(tcgArgs("daemon"), "-daemonize", "-pidfile", pidfile)...), 30*time.Second)
	if r.code != 0 {
		t.Fatalf("kvmscope-qemu -daemonize: code %d\n%s", r.code, r.stderr)
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	if pid <= 0 || !alive(pid) {
		t.Fatalf("pid file names %d, not a running QEMU", pid)
	}
	defer syscall.Kill(pid, syscall.SIGKILL)
	if strings.Contains(procStatus(pid), "TracerPid:\t0\n") {
		t.Fatalf("the QEMU daemon is not traced")
	}
	sock := filepath.Join(sockDir, "daemon.sock")
	waitFile(t, sock, 20*time.Second)
	if vm := waitVCPUs(t, sock, 1); vm.Pid != pid {
		t.Errorf("API names pid %d, want the daemon %d", vm.Pid, pid)
	}
	syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the detached tracer left %s", sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
	checkEventLog(t, filepath.Join(sockDir, "daemon.log"), "daemon")
}
