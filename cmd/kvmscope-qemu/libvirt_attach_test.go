package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// TestLibvirtAttachAndList (issue 12): one host, three VMs served three
// ways: a libvirt domain whose emulator is kvmscope-qemu, a libvirt domain
// on plain QEMU that `kvmscope attach --vm` serves through libvirt's
// monitor, and a VM launched under `kvmscope run`. `kvmscope list` shows
// all three, `ps --all` each one's processes, and a detach leaves the
// attached domain running.
func TestLibvirtAttachAndList(t *testing.T) {
	needLibvirt(t)
	guests := testlinux.Require(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := launch.LoadConfig(launch.DefaultConfigPath)
	if err != nil {
		t.Fatalf("this host's %s: %v", launch.DefaultConfigPath, err)
	}
	sockDir := cfg.SocketDir
	dir := guestFiles(t)
	wrapped := fmt.Sprintf("kvmscope-wrapped-%d", os.Getpid())
	plain := fmt.Sprintf("kvmscope-plain-%d", os.Getpid())
	defineDomain(t, dir, wrapped, domainXML(wrapped, dir, wrapperBin), sockDir)
	defineDomain(t, dir, plain, domainXML(plain, dir, qemu), sockDir)
	mustVirsh(t, "start", wrapped)
	mustVirsh(t, "start", plain)

	// The launched one, served in the same socket directory.
	launched := fmt.Sprintf("kvmscope-launched-%d", os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:    guests.DebianKernel,
		Accel:     "tcg",
		ExtraArgs: []string{"-name", launched},
		Wrapper:   []string{kvmscopeBin, "--log-level", "warn", "run", "--api", filepath.Join(sockDir, launched+".sock"), "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()

	// The plain domain, attached by its libvirt name.
	plainPid := readPidFile(t, "/run/libvirt/qemu/"+plain+".pid")
	attach := exec.Command(kvmscopeBin, "--log-level", "warn", "attach", "--vm", plain)
	var attachErr strings.Builder
	attach.Stderr = &attachErr
	if err := attach.Start(); err != nil {
		t.Fatal(err)
	}
	attached := make(chan error, 1)
	go func() { attached <- attach.Wait() }()
	defer func() {
		attach.Process.Kill()
		if t.Failed() {
			t.Logf("kvmscope attach --vm stderr:\n%s", attachErr.String())
		}
	}()
	waitFile(t, filepath.Join(sockDir, plain+".sock"), 60*time.Second)

	// Every guest booted: ps finds the initramfs's last process in each.
	for _, vm := range []string{wrapped, plain, launched} {
		deadline := time.Now().Add(3 * time.Minute)
		for {
			r := cli(t, "ps", "--vm", vm)
			if r.code == 0 && strings.Contains(r.stdout, "kvm-odd_name.x") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("kvmscope ps --vm %s: code %d\n%s%s", vm, r.code, r.stdout, r.stderr)
			}
			time.Sleep(time.Second)
		}
	}

	r := cli(t, "list", "--json", "--dir", sockDir)
	if r.code != 0 {
		t.Fatalf("kvmscope list: code %d\n%s", r.code, r.stderr)
	}
	var list []struct {
		Name      string `json:"name"`
		State     string `json:"state"`
		Pid       int    `json:"pid"`
		TracerPid int    `json:"tracer_pid"`
		Accel     string `json:"accel"`
		VCPUs     int    `json:"vcpus"`
		Kernel    string `json:"kernel"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("list --json: %v\n%s", err, r.stdout)
	}
	want := map[string]bool{wrapped: true, plain: false, launched: true} // traced?
	for _, v := range list {
		traced, ok := want[v.Name]
		if !ok {
			continue
		}
		delete(want, v.Name)
		if v.State != "up" || v.Accel != "tcg" || v.VCPUs < 1 || !strings.HasPrefix(v.Kernel, "6.1") || v.Pid == 0 {
			t.Errorf("list: %+v", v)
		}
		if traced != (v.TracerPid != 0) {
			t.Errorf("list: %s has tracer pid %d", v.Name, v.TracerPid)
		}
		if v.Name == plain && v.Pid != plainPid {
			t.Errorf("list: %s has pid %d, libvirt's pid file says %d", plain, v.Pid, plainPid)
		}
	}
	if len(want) != 0 {
		t.Errorf("list misses %v:\n%s", want, r.stdout)
	}

	r = cli(t, "ps", "--all", "--json", "--dir", sockDir)
	if r.code != 0 {
		t.Fatalf("ps --all: code %d\n%s", r.code, r.stderr)
	}
	var all []struct {
		VM        string `json:"vm"`
		Processes []struct {
			PID  int    `json:"pid"`
			Comm string `json:"comm"`
		} `json:"processes"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &all); err != nil {
		t.Fatalf("ps --all --json: %v", err)
	}
	seen := map[string]bool{}
	for _, e := range all {
		for _, p := range e.Processes {
			if p.Comm == "kvm-odd_name.x" {
				seen[e.VM] = true
			}
		}
	}
	for _, vm := range []string{wrapped, plain, launched} {
		if !seen[vm] {
			t.Errorf("ps --all: no kvm-odd_name.x in %s", vm)
		}
	}

	// Detach: the attached domain runs on, as libvirt sees it.
	if r := cli(t, "detach", "--vm", plain); r.code != 0 {
		t.Fatalf("detach --vm %s: code %d\n%s", plain, r.code, r.stderr)
	}
	select {
	case err := <-attached:
		if err != nil {
			t.Errorf("kvmscope attach after detach: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("kvmscope attach did not end after detach")
	}
	if st := strings.TrimSpace(mustVirsh(t, "domstate", plain)); st != "running" {
		t.Errorf("%s after detach: %s", plain, st)
	}
}

func readPidFile(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 0 {
		t.Fatalf("%s: %q", path, b)
	}
	return pid
}
