package testlinux

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// checkPS checks the process table against what scripts/initramfs/init
// starts.
func checkPS(t *testing.T, g *Guest) {
	t.Helper()
	ps := g.PS()
	byPID := map[int]Proc{}
	for _, p := range ps {
		byPID[p.PID] = p
	}
	sleeps, uid1000, odd := 0, 0, 0
	parents := map[int]bool{}
	for _, p := range ps {
		switch p.Comm {
		case "sleep":
			sleeps++
			parents[p.PPID] = true
		case "kvm-uid1000":
			if p.UID == 1000 && p.GID == 1000 && p.PPID == 1 {
				uid1000++
			}
		case "kvm-odd_name.x":
			odd++
		}
	}
	if sleeps != 40 || uid1000 != 1 || odd != 1 || len(parents) != 3 {
		t.Errorf("process table: %d sleeps under %d parents, %d uid-1000, %d odd-name; want 40, 3, 1, 1", sleeps, len(parents), uid1000, odd)
	}
	if p, ok := byPID[1]; !ok || p.Comm != "init" || p.PPID != 0 {
		t.Errorf("pid 1 = %+v", p)
	}
	if p, ok := byPID[2]; !ok || p.Comm != "kthreadd" {
		t.Errorf("pid 2 = %+v", p)
	}
}

func TestBootDebianAndDump(t *testing.T) {
	p := Require(t)
	g, err := Boot(context.Background(), Options{Kernel: p.DebianKernel})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	t.Logf("Debian %s booted in %v (TCG, 512 MiB, 2 vCPUs)", g.Release(), g.BootTime())
	if !strings.HasPrefix(g.Release(), "6.1.") {
		t.Errorf("release %q", g.Release())
	}
	checkPS(t, g)
	ks := g.Kallsyms()
	if ks["_text"] == 0 || ks["linux_banner"] <= ks["_text"] || ks["init_task"] == 0 {
		t.Errorf("kallsyms: %v", ks)
	}
	out, err := g.HMP("info registers")
	if err != nil || !strings.Contains(out, "CR3=") {
		t.Errorf("info registers: %q, %v", out, err)
	}
	if _, err := g.QMP("no-such-command", nil); err == nil {
		t.Error("unknown QMP command succeeded")
	}
	dump := filepath.Join(t.TempDir(), "core")
	if err := g.Dump(dump); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte("\x7fELF")) || len(b) < 512<<20 {
		t.Errorf("dump: %d bytes starting %q", len(b), b[:min(len(b), 4)])
	}
	if !bytes.Contains(b, []byte("Linux version 6.1.")) {
		t.Error("dump lacks the Linux banner")
	}
}

func TestBootGokrazy(t *testing.T) {
	p := Require(t)
	// env(1) as a stand-in wrapper: QEMU runs as its argument, the way
	// `kvmscope run --` runs it. "nokaslr" reaches the kernel.
	env, err := exec.LookPath("env")
	if err != nil {
		t.Fatal(err)
	}
	g, err := Boot(context.Background(), Options{Kernel: p.GokrazyKernel, Wrapper: []string{env, "KVMSCOPE_WRAPPED=1"}, Append: "nokaslr", SMP: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	t.Logf("gokrazy %s booted in %v (TCG, 512 MiB, 1 vCPU)", g.Release(), g.BootTime())
	checkPS(t, g)
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", g.Pid()))
	if err != nil || !bytes.Contains(environ, []byte("KVMSCOPE_WRAPPED=1")) {
		t.Errorf("QEMU did not run under the wrapper: %v", err)
	}
	if text := g.Kallsyms()["_text"]; text != 0xffffffff81000000 {
		t.Errorf("_text at %#x with nokaslr", text)
	}
	out, err := g.HMP("info cpus")
	if err != nil || strings.Count(out, "CPU #") != 1 {
		t.Errorf("info cpus with SMP 1: %q %v", out, err)
	}
}

func TestGuestsMissing(t *testing.T) {
	t.Setenv("KVMSCOPE_GUESTS", t.TempDir())
	if _, err := Guests(); err == nil || !strings.Contains(err.Error(), "just guests") {
		t.Errorf("Guests() in an empty dir: %v", err)
	}
}
