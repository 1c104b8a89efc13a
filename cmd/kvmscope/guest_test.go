package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/session"
)

// TestGuestLinux boots real Linux guests under `kvmscope run`, on TCG and
// on KVM, and checks that `kvmscope ps` agrees with the guest's own /proc
// table, process for process, live and from a dump of the same guest; that
// every vCPU's registers are a running kernel's; and that kernel, offsets
// and lsmod work on both.
func TestGuestLinux(t *testing.T) {
	p := testlinux.Require(t)
	for _, tc := range []struct {
		name   string
		kernel string
		btf    bool
		accel  string
		// memfd backs guest RAM with a memfd, read in place, and lets
		// the API write guest memory (--allow-write).
		memfd bool
		// policy runs QEMU under the shipped ioctl policy, which must
		// know every request it makes (docs/policy.md).
		policy bool
	}{
		{"debian-6.1", p.DebianKernel, true, "tcg", false, false},
		{"debian-6.1-memfd", p.DebianKernel, true, "tcg", true, false},
		{"gokrazy-7.x", p.GokrazyKernel, false, "tcg", false, false},
		{"debian-6.1-kvm", p.DebianKernel, true, "kvm", false, true},
		{"debian-6.1-kvm-memfd", p.DebianKernel, true, "kvm", true, false},
		{"gokrazy-7.x-kvm", p.GokrazyKernel, false, "kvm", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.accel == "kvm" {
				// KVM that boots Linux: hardware, or the nested lab.
				testenv.Require(t, testenv.FastKVM)
			}
			sock := filepath.Join(t.TempDir(), "api.sock")
			ctx, cancel := context.WithTimeout(context.Background(), labBoot+2*time.Minute)
			defer cancel()
			run := []string{kvmscopeBin, "--log-level", "warn", "run", "--api", sock}
			if tc.policy {
				run = append(run, "--policy", "default")
			}
			opts := testlinux.Options{Kernel: tc.kernel, Accel: tc.accel}
			if tc.accel == "kvm" {
				// The guard protects the dispatch once the guest is up.
				run = append(run, "--guard")
				// In the nested-KVM lab (L1 emulated) gokrazy's /init
				// takes a minute, more on a loaded host.
				opts.Timeout = labBoot
			}
			if tc.memfd {
				run = append(run, "--allow-write")
				opts.ExtraArgs = []string{"-object", "memory-backend-memfd,id=ram,size=512M", "-machine", "memory-backend=ram"}
			}
			opts.Wrapper = append(run, "--")
			g, err := testlinux.Boot(ctx, opts)
			if err != nil {
				t.Fatalf("boot under kvmscope run: %v", err)
			}
			defer g.Close()

			live := psJSON(t, "--api", sock)
			checkPS(t, "live", live, g.PS())
			checkVCPUs(t, sock, g, tc.accel)
			checkSource(t, sock, tc.memfd, tc.memfd)

			// The kernel and where each offset came from.
			out, errOut, code := kvmscope(t, "kernel", "--api", sock, "--json")
			if code != 0 {
				t.Fatalf("kvmscope kernel: %s", errOut)
			}
			var k api.Kernel
			if err := json.Unmarshal([]byte(out), &k); err != nil {
				t.Fatal(err)
			}
			if k.BTF != tc.btf || !strings.HasPrefix(k.Banner, "Linux version "+g.Release()) {
				t.Errorf("kernel: btf %v banner %q; want btf %v and release %s", k.BTF, k.Banner, tc.btf, g.Release())
			}
			wantSource := "solved"
			if tc.btf {
				wantSource = "btf"
			}
			for _, m := range k.Offsets {
				if m.Name == "task_struct.tasks" && m.Source != wantSource {
					t.Errorf("task_struct.tasks came from %q, want %q", m.Source, wantSource)
				}
			}
			for _, f := range []string{"json", "isf"} {
				out, errOut, code := kvmscope(t, "offsets", "--api", sock, "--format", f)
				if code != 0 || !json.Valid([]byte(out)) {
					t.Errorf("offsets --format %s: code %d, valid JSON %v, %s", f, code, json.Valid([]byte(out)), errOut)
				}
			}
			if out, errOut, code := kvmscope(t, "offsets", "--api", sock, "--format", "libvmi", "--name", "vm1"); code != 0 || !strings.Contains(out, "linux_tasks") {
				t.Errorf("offsets --format libvmi: code %d\n%s%s", code, out, errOut)
			}
			if _, errOut, code := kvmscope(t, "lsmod", "--api", sock, "--json"); code != 0 {
				t.Errorf("lsmod: %s", errOut)
			}
			// The dispatch of a clean kernel; under KVM LSTAR is read
			// too (KVM_GET_MSRS injected as QEMU) and checked.
			if out, errOut, code := kvmscope(t, "integrity", "--api", sock, "--json"); code != 0 || strings.TrimSpace(out) != "[]" {
				t.Errorf("integrity of a clean kernel: code %d, %s%s", code, out, errOut)
			} else if tc.accel == "kvm" && strings.Contains(errOut, "LSTAR not") {
				t.Errorf("integrity under KVM did not check LSTAR: %s", errOut)
			}
			if tc.accel == "kvm" {
				checkGuardArmed(t, sock)
				// The guard's carve is invisible to the guest and to us.
				if out, errOut, code := kvmscope(t, "integrity", "--api", sock, "--json"); code != 0 || strings.TrimSpace(out) != "[]" {
					t.Errorf("integrity with the guard on: code %d, %s%s", code, out, errOut)
				}
				if tc.memfd {
					// Host writes into guarded pages (tamper, then
					// --restore with QEMU paused) still work, and a
					// hooked LSTAR is put back.
					tamperAndRestore(t, sock, readBaseline(t, sock))
					hookAndRestoreLSTAR(t, sock, g)
				}
			}
			if !tc.memfd {
				// Without --allow-write nothing may be written back.
				if _, errOut, code := kvmscope(t, "integrity", "--api", sock, "--restore"); code == 0 || !strings.Contains(errOut, "--allow-write") {
					t.Errorf("integrity --restore without --allow-write: code %d, %s", code, errOut)
				}
			}
			// A consistent scan pauses QEMU and resumes it.
			checkPS(t, "consistent", psJSON(t, "--api", sock, "--consistent"), g.PS())

			// The same guest from a dump written by kvmscope dump.
			core := filepath.Join(t.TempDir(), "guest.core")
			if _, errOut, code := kvmscope(t, "dump", "--api", sock, "-o", core); code != 0 {
				t.Fatalf("kvmscope dump: %s", errOut)
			}
			checkPS(t, "dump", psJSON(t, "--core", core), g.PS())
			checkCoreSource(t, core)
			// The guest runs on after a dump (the dump paused it).
			checkPS(t, "after dump", psJSON(t, "--api", sock), g.PS())
			if _, errOut, code := kvmscope(t, "dump", "--api", sock, "-o", core); code == 0 || !strings.Contains(errOut, "exists") {
				t.Errorf("dump over an existing file: code %d, %q", code, errOut)
			}
			if tc.policy {
				checkNoUnseen(t, sock)
			}
		})
	}
}

// checkGuardArmed waits until run --guard has protected the guest's
// dispatch: the tables and, on a kernel that dispatches through it,
// x64_sys_call, with no page left unprotected.
func checkGuardArmed(t *testing.T, sock string) {
	t.Helper()
	var g session.Guard
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, errOut, code := kvmscope(t, "guard", "--api", sock, "--json")
		if code != 0 {
			t.Fatalf("guard: %s", errOut)
		}
		if err := json.Unmarshal([]byte(out), &g); err != nil {
			t.Fatal(err)
		}
		if len(g.Protected) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--guard did not protect the dispatch within 90 s: %s", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	what := map[string]bool{}
	for _, tg := range g.Targets {
		what[tg.What] = true
	}
	if !what["sys_call_table"] || !what["x64_sys_call"] || len(g.Unprotected) != 0 {
		t.Errorf("guard: targets %v, unprotected %v; want sys_call_table, x64_sys_call and nothing unprotected", g.Targets, g.Unprotected)
	}
	t.Logf("guard: %d ranges protected, targets %v", len(g.Protected), g.Targets)
}

func psJSON(t *testing.T, args ...string) []api.Process {
	t.Helper()
	out, errOut, code := kvmscope(t, append([]string{"ps", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("kvmscope ps %v: code %d: %s", args, code, errOut)
	}
	var ps []api.Process
	if err := json.Unmarshal([]byte(out), &ps); err != nil {
		t.Fatalf("ps --json: %v", err)
	}
	return ps
}

// checkPS compares our process list with the guest's own. User processes
// must match exactly; kernel threads may come and go (workqueue workers)
// and /proc shows a worker's current work after its comm.
func checkPS(t *testing.T, what string, ours []api.Process, guest []testlinux.Proc) {
	t.Helper()
	byPID := map[int]api.Process{}
	for _, p := range ours {
		byPID[p.PID] = p
	}
	users := 0
	for _, g := range guest {
		kthread := g.PID == 2 || g.PPID == 2
		o, ok := byPID[g.PID]
		if !ok {
			if !kthread {
				t.Errorf("%s: guest process %d %q not listed", what, g.PID, g.Comm)
			}
			continue
		}
		if kthread {
			continue
		}
		users++
		if o.Comm != g.Comm || o.PPID != g.PPID || o.UID != g.UID || o.GID != g.GID || o.KThread {
			t.Errorf("%s: pid %d = comm %q ppid %d uid %d gid %d kthread %v; guest says %q ppid %d uid %d gid %d",
				what, g.PID, o.Comm, o.PPID, o.UID, o.GID, o.KThread, g.Comm, g.PPID, g.UID, g.GID)
		}
	}
	if users < 40 {
		t.Errorf("%s: only %d user processes compared; the guest starts over 40", what, users)
	}
	// Nothing we list is invented: every user process we see, the guest saw.
	inGuest := map[int]bool{}
	for _, g := range guest {
		inGuest[g.PID] = true
	}
	for _, o := range ours {
		if !o.KThread && o.PID != 0 && !inGuest[o.PID] {
			t.Errorf("%s: we list user process %d %q the guest does not", what, o.PID, o.Comm)
		}
	}
}

// checkVCPUs: `kvmscope vcpus` gives each vCPU's registers, fresh, from the
// source the accelerator implies (kvm_run sync regs on KVM, QMP on TCG).
// The guest idles, so its vCPUs are in 64-bit mode with the kernel's page
// tables, at least one of them in kernel text ([_text, _etext) from the
// guest's own /proc/kallsyms); none is anywhere else but user space.
func checkVCPUs(t *testing.T, sock string, g *testlinux.Guest, accel string) {
	t.Helper()
	out, errOut, code := kvmscope(t, "vcpus", "--api", sock, "--json")
	if code != 0 {
		t.Fatalf("kvmscope vcpus: %s", errOut)
	}
	var cpus []api.VCPU
	if err := json.Unmarshal([]byte(out), &cpus); err != nil {
		t.Fatalf("vcpus --json: %v\n%s", err, out)
	}
	ks := g.Kallsyms()
	text, etext := ks["_text"], ks["_etext"]
	if text == 0 || etext <= text {
		t.Fatalf("guest kallsyms: _text %#x _etext %#x", text, etext)
	}
	if len(cpus) != 2 {
		t.Fatalf("%d vCPUs, want 2: %s", len(cpus), out)
	}
	inText := 0
	for _, c := range cpus {
		rip := uint64(c.RIP)
		switch {
		case rip >= text && rip < etext:
			inText++
		case rip < 1<<47:
			// A vCPU caught in user space.
		default:
			t.Errorf("%s: vCPU %d RIP %#x is neither kernel text [%#x, %#x) nor user space", accel, c.ID, rip, text, etext)
		}
		if c.Mode != "long" || uint64(c.CR3) == 0 {
			t.Errorf("%s: vCPU %d mode %q CR3 %#x, want long mode with page tables", accel, c.ID, c.Mode, uint64(c.CR3))
		}
	}
	if inText == 0 {
		t.Errorf("%s: no vCPU in kernel text [%#x, %#x): %s", accel, text, etext, out)
	}
}

// checkSource checks that what the memory source below can do survives
// the production stack up to the scans (session, metering), as GET /v1/vm
// reports it and as a scan's read calls show it: with batched reads, a
// scan makes about one read call per task, where reads one at a time
// would make several per task and one per page-table entry.
func checkSource(t *testing.T, sock string, inPlace, writable bool) {
	t.Helper()
	c := api.NewClient(sock)
	var vm api.VM
	if err := c.Get(ctxT(t), "/v1/vm", &vm); err != nil {
		t.Fatal(err)
	}
	src := vm.Source
	if src == nil {
		t.Fatal("GET /v1/vm has no source capabilities")
	}
	if !src.Batch || src.Write != writable || (len(src.InPlace) > 0) != inPlace {
		t.Errorf("source as the scans see it: %+v; want batch, write %v, RAM read in place %v", *src, writable, inPlace)
	}
	resp, err := c.Response(ctxT(t), "/v1/processes")
	if err != nil {
		t.Fatal(err)
	}
	var ps []api.Process
	err = json.NewDecoder(resp.Body).Decode(&ps)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	reads, _ := strconv.Atoi(resp.Header.Get(api.HeaderScanReads))
	bytes, _ := strconv.Atoi(resp.Header.Get(api.HeaderScanReadBytes))
	t.Logf("scan of %d processes: %d read calls, %d bytes; source %+v", len(ps), reads, bytes, *src)
	if reads == 0 || reads > len(ps)+64 {
		t.Errorf("a scan of %d processes made %d read calls; batched reads make at most one per task and a few more", len(ps), reads)
	}
	if bytes == 0 || bytes > 2048*len(ps)+1<<20 {
		t.Errorf("a scan of %d processes read %d bytes; it should read only the members it needs", len(ps), bytes)
	}
}

// checkCoreSource checks that the --core path's session keeps the core's
// capabilities.
func checkCoreSource(t *testing.T, path string) {
	t.Helper()
	core, err := guestmem.OpenCore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer core.Close()
	got, err := session.New(session.Frozen{Src: core}, nil).Capabilities()
	if err != nil {
		t.Fatal(err)
	}
	if want := guestmem.CapabilitiesOf(core); !reflect.DeepEqual(got, want) {
		t.Errorf("a core's capabilities through the session: %+v; the core's own: %+v", got, want)
	}
}
