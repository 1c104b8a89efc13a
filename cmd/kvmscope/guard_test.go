package main

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/session"
)

// TestGuardBlocksWrite is the guard's test through the CLI and the API:
// the tiny guest stores into pattern page 0, which `kvmscope guard --gpa`
// protects. The value in memory is unchanged, the guest runs on and
// reports what it read back, and `kvmscope blocked --json` holds one
// entry with the address (physical and virtual), the bytes, the vCPU and
// the RIP of the store instruction. The store into page 1 lands; /metrics
// counts the blocked write; the event stream has it too.
func TestGuardBlocksWrite(t *testing.T) {
	kernel, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	storeRIP, err := testguest.Symbol(kernel, "guard_store")
	if err != nil {
		t.Fatal(err)
	}
	r := startRun(t, []string{"--guard", "--allow-write"}, tinyGuest(t, 1, "guard=1")...)
	c := r.client()
	waitReady(t, c)
	page0 := readMem(t, c, testguest.PatternGPA, 4096)

	out, errOut, code := kvmscope(t, "guard", "--api", r.sock, "--gpa", fmt.Sprintf("%#x", testguest.PatternGPA), "--json")
	if code != 0 {
		t.Fatalf("guard --gpa: code %d: %s", code, errOut)
	}
	var g session.Guard
	if err := json.Unmarshal([]byte(out), &g); err != nil || len(g.Protected) != 1 || g.Protected[0].GPA != testguest.PatternGPA || g.Protected[0].Size != 4096 {
		t.Fatalf("guard --gpa: %s (%v)", out, err)
	}
	if err := c.Put(ctxT(t), fmt.Sprintf("/v1/memory?gpa=%#x", testguest.GoGPA), binary.LittleEndian.AppendUint64(nil, 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the guest to finish its stores", func() bool { return readU64(t, c, testguest.GuardDoneGPA) == 1 })
	if got := readMem(t, c, testguest.PatternGPA, 4096); string(got) != string(page0) {
		t.Errorf("the guarded page changed at %#x: %q", testguest.GuardTargetGPA, got[0x100:0x108])
	}
	if v := readU64(t, c, testguest.GuardSeenGPA); v != binary.LittleEndian.Uint64(page0[0x100:]) {
		t.Errorf("the guest read back %#x, want the unchanged %#x", v, binary.LittleEndian.Uint64(page0[0x100:]))
	}
	if v := readU64(t, c, testguest.GuardNeighbourGPA); v != testguest.GuardValue {
		t.Errorf("the neighbouring page holds %#x, want the guest's store %#x", v, uint64(testguest.GuardValue))
	}
	c0 := readU64(t, c, testguest.CounterGPA)
	waitFor(t, 10*time.Second, "the guest to run on", func() bool { return readU64(t, c, testguest.CounterGPA) != c0 })

	// The log: one entry, through the CLI.
	var lines []string
	waitFor(t, 10*time.Second, "the blocked write in the log", func() bool {
		out, _, _ := kvmscope(t, "blocked", "--api", r.sock, "--json")
		lines = strings.Split(strings.TrimSpace(out), "\n")
		return lines[0] != ""
	})
	if len(lines) != 1 {
		t.Fatalf("blocked: %d entries, want 1:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	var e session.BlockedWrite
	if err := json.Unmarshal([]byte(lines[0]), &e); err != nil {
		t.Fatal(err)
	}
	want := hex.EncodeToString(binary.LittleEndian.AppendUint64(nil, testguest.GuardValue))
	if e.Source != "guest" || e.VCPU == nil || *e.VCPU != 0 || e.GPA != fmt.Sprintf("%#x", testguest.GuardTargetGPA) ||
		e.GVA != fmt.Sprintf("%#x", uint64(testguest.GuardTargetVA)) || e.Bytes != want || e.RIP != fmt.Sprintf("%#x", storeRIP) || e.Landed || e.At.IsZero() {
		t.Errorf("blocked write %s\nwant vcpu 0, gpa %#x, gva %#x, bytes %s, rip %#x", lines[0], testguest.GuardTargetGPA, uint64(testguest.GuardTargetVA), want, storeRIP)
	}
	if out, _, _ := kvmscope(t, "blocked", "--api", r.sock); !strings.Contains(out, "vcpu 0") || !strings.Contains(out, want) {
		t.Errorf("blocked (text): %s", out)
	}
	b, err := c.GetRaw(ctxT(t), "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "kvmscope_guard_blocked_writes_total 1") {
		t.Errorf("/metrics does not count the blocked write")
	}
	if out, _, _ := kvmscope(t, "events", "--api", r.sock, "--json"); !strings.Contains(out, `"kind":"blocked_write"`) {
		t.Errorf("no blocked_write event:\n%s", out)
	}
	if out, _, code := kvmscope(t, "guard", "--api", r.sock, "--off"); code != 0 || !strings.Contains(out, "nothing") {
		t.Errorf("guard --off: %d %s", code, out)
	}
}

// TestGuardNeedsPermission: a VM started with neither --guard nor
// --allow-write shows the guard but refuses to change it, with one line.
func TestGuardNeedsPermission(t *testing.T) {
	r := startRun(t, nil, tinyGuest(t, 1, "")...)
	c := r.client()
	waitReady(t, c)
	if out, errOut, code := kvmscope(t, "guard", "--api", r.sock); code != 0 || !strings.Contains(out, "nothing") {
		t.Errorf("guard: %d %s %s", code, out, errOut)
	}
	_, errOut, code := kvmscope(t, "guard", "--api", r.sock, "--gpa", "0x200000")
	if code == 0 || !strings.Contains(errOut, "--guard or --allow-write") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("guard --gpa without permission: code %d, stderr %q", code, errOut)
	}
	if _, errOut, code := kvmscope(t, "guard", "--api", r.sock, "--gpa", "nope"); code != 2 || !strings.Contains(errOut, "ADDR[+LEN]") {
		t.Errorf("guard --gpa nope: code %d, stderr %q", code, errOut)
	}
}

// TestGuardLinux: a Linux guest under KVM (the nested-KVM lab here) with
// `run --guard` keeps working once its dispatch is protected. The
// initramfs starts crypto-miner 25 s after boot, through fork and exec
// (system calls dispatched by x64_sys_call, whose pages are guarded); it
// must show up. A clean kernel's run blocks nothing (its own text
// patching of the pages, if any, is let through), and integrity stays [].
// labBoot bounds a Linux boot under KVM: in the nested-KVM lab, where L1
// is emulated, gokrazy's /init (which reads all of /proc/kallsyms) takes
// about a minute, and more while the host is busy.
const labBoot = 4 * time.Minute

func TestGuardLinux(t *testing.T) {
	p := testlinux.Require(t)
	for _, tc := range []struct{ name, kernel string }{
		{"debian-6.1-kvm", p.DebianKernel},
		{"gokrazy-7.x-kvm", p.GokrazyKernel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testenv.Require(t, testenv.FastKVM)
			sock := filepath.Join(t.TempDir(), "api.sock")
			ctx, cancel := context.WithTimeout(context.Background(), labBoot+2*time.Minute)
			defer cancel()
			g, err := testlinux.Boot(ctx, testlinux.Options{
				Kernel:  tc.kernel,
				Accel:   "kvm",
				Append:  "kvmscope.late=25",
				Wrapper: []string{kvmscopeBin, "--log-level", "info", "run", "--guard", "--api", sock, "--"},
				Timeout: labBoot,
			})
			if err != nil {
				t.Fatalf("boot under kvmscope run --guard: %v", err)
			}
			defer g.Close()
			checkGuardArmed(t, sock)
			out, _, _ := kvmscope(t, "guard", "--api", sock, "--json")
			var st session.Guard
			if err := json.Unmarshal([]byte(out), &st); err != nil || len(st.Notes) != 0 {
				t.Errorf("guard: %s (%v); want no notes (poking_mm found)", out, err)
			}
			waitFor(t, 90*time.Second, "crypto-miner to start with the guard on", func() bool {
				for _, p := range psJSON(t, "--api", sock) {
					if p.Comm == "crypto-miner" {
						return true
					}
				}
				return false
			})
			if devs := integrityJSON(t, "guarded", "--api", sock); len(devs) != 0 {
				t.Errorf("integrity with the guard on: %+v", devs)
			}
			out, _, _ = kvmscope(t, "blocked", "--api", sock, "--json")
			for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
				var e session.BlockedWrite
				if l != "" && (json.Unmarshal([]byte(l), &e) != nil || !e.Landed) {
					t.Errorf("a clean guest had a write blocked: %s", l)
				}
			}
			t.Logf("guard: %d blocked, %d let through; %s", st.Blocked, st.Allowed, strings.TrimSpace(out))
		})
	}
}
