package introspect

import (
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// comparePS checks a process list read from outside against the guest's
// own /proc table, process for process. Kernel threads may come and go
// between the two (workqueue workers), and /proc shows a worker's name
// with its workqueue appended ("kworker/0:1-events"); nothing else may
// differ.
func comparePS(t *testing.T, ours []Process, guest []testlinux.Proc) {
	t.Helper()
	byPID := map[int]Process{}
	for _, p := range ours {
		if _, dup := byPID[p.PID]; dup {
			t.Errorf("pid %d listed twice", p.PID)
		}
		byPID[p.PID] = p
	}
	seen := map[int]bool{}
	users, odd, uid1000 := 0, false, false
	for _, g := range guest {
		kthread := g.PID == 2 || g.PPID == 2
		o, ok := byPID[g.PID]
		if !ok {
			if kthread {
				t.Logf("kernel thread %d %q gone since the guest listed it", g.PID, g.Comm)
				continue
			}
			t.Errorf("guest process %d %q (ppid %d uid %d) not found", g.PID, g.Comm, g.PPID, g.UID)
			continue
		}
		seen[g.PID] = true
		commOK := o.Comm == g.Comm || kthread && strings.HasPrefix(o.Comm, "kworker") &&
			strings.HasPrefix(g.Comm, o.Comm+"-")
		if kthread && len(o.Comm) == 15 && strings.HasPrefix(g.Comm, o.Comm) {
			// /proc shows a kernel thread's full name; comm holds
			// its first 15 bytes.
			commOK = true
		}
		if kthread && strings.HasPrefix(o.Comm, "kworker/") && strings.HasPrefix(g.Comm, "kworker/") {
			// A worker's name changes with the work it runs.
			commOK = strings.HasPrefix(g.Comm+"-", strings.SplitN(o.Comm, "-", 2)[0])
		}
		if !commOK || o.PPID != g.PPID || o.UID != g.UID || o.GID != g.GID || o.EUID != g.UID || o.KThread != kthread {
			t.Errorf("pid %d: got comm %q ppid %d uid %d gid %d euid %d kthread %v; guest says %q ppid %d uid %d gid %d kthread %v",
				g.PID, o.Comm, o.PPID, o.UID, o.GID, o.EUID, o.KThread, g.Comm, g.PPID, g.UID, g.GID, kthread)
		}
		if o.TGID != o.PID {
			t.Errorf("pid %d: tgid %d on a group leader", o.PID, o.TGID)
		}
		if !kthread {
			users++
			if o.PGD == 0 || o.PGD&0xfff != 0 {
				t.Errorf("pid %d: page-table root %#x", o.PID, o.PGD)
			}
			if o.StartTime == 0 {
				t.Errorf("pid %d: no start time", o.PID)
			}
			if len(o.Cmdline) == 0 {
				t.Errorf("pid %d %q: no command line", o.PID, o.Comm)
			}
		}
		odd = odd || o.Comm == "kvm-odd_name.x"
		uid1000 = uid1000 || o.UID == 1000
	}
	for _, o := range ours {
		if !seen[o.PID] && o.PID != 0 && !o.KThread {
			t.Errorf("process %d %q (ppid %d) is not in the guest's table", o.PID, o.Comm, o.PPID)
		}
	}
	if users < 40 {
		t.Errorf("only %d user processes matched, want >= 40", users)
	}
	if !odd || !uid1000 {
		t.Errorf("odd-named process found: %v, uid-1000 process found: %v", odd, uid1000)
	}
	t.Logf("%d guest processes matched (%d user processes)", len(seen), users)
}

// checkThreads checks the thread walk on the multi-threaded test process.
func checkThreads(t *testing.T, k *Kernel, off *Offsets, ps []Process) {
	t.Helper()
	var leader *Process
	for i := range ps {
		if ps[i].Comm == "kvm-threads" {
			leader = &ps[i]
		}
	}
	if leader == nil {
		t.Error("kvm-threads process not found")
		return
	}
	if leader.Threads < 5 {
		t.Errorf("kvm-threads has %d threads, want >= 5 (4 locked goroutines + main)", leader.Threads)
	}
	all, err := k.Processes(off, ProcessOptions{Threads: true, NoCmdline: true})
	if err != nil {
		t.Fatalf("Processes with threads: %v", err)
	}
	pids := map[int]bool{}
	n := 0
	for _, p := range all {
		if pids[p.PID] {
			t.Errorf("thread %d listed twice", p.PID)
		}
		pids[p.PID] = true
		if p.TGID == leader.PID {
			n++
			if p.Comm != "kvm-threads" || p.PPID != leader.PPID || p.UID != leader.UID {
				t.Errorf("thread %+v does not match its leader %+v", p, *leader)
			}
		}
	}
	if n != leader.Threads {
		t.Errorf("%d threads listed in group %d, leader says %d", n, leader.PID, leader.Threads)
	}
	if len(all) <= len(ps) {
		t.Errorf("with threads: %d entries, without: %d", len(all), len(ps))
	}
}

func TestStateLetter(t *testing.T) {
	for v, want := range map[uint32]string{
		0: "R", 1: "S", 0x2001: "S", 2: "D", 0x402: "I", 0x102: "D", 4: "T", 8: "t", 0x40: "P", 0x80: "Z",
	} {
		if got := stateLetter(v); got != want {
			t.Errorf("stateLetter(%#x) = %q, want %q", v, got, want)
		}
	}
	for v, want := range map[uint32]bool{0: true, 1: true, 0x402: true, 0x2001: true, 3: false, 0x11: false, 0x10000: false} {
		if validState(v) != want {
			t.Errorf("validState(%#x) = %v", v, !want)
		}
	}
}

func TestValidComm(t *testing.T) {
	for _, c := range []struct {
		in            string
		ok, printable bool
	}{
		{"swapper/0\x00\x00\x00\x00\x00\x00\x00", true, true},
		{"kvm-odd_name.x\x00\x00", true, true},
		{"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", false, false},
		{"0123456789abcdef", false, false},
		{"\xff\xfe\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", true, false},
	} {
		_, ok, pr := validComm([]byte(c.in))
		if ok != c.ok || pr != c.printable {
			t.Errorf("validComm(%q) = %v, %v; want %v, %v", c.in, ok, pr, c.ok, c.printable)
		}
	}
}
