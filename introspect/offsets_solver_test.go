package introspect

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// The tests here boot the real guests (scripts/fetch-guests.sh) under TCG
// with the project's busybox initramfs plus a second archive that, before
// the usual /init runs, loads the Debian kernel modules found in
// <guests>/debian/modules/*.ko (if any), prints /proc/modules, and starts
// a multi-threaded process (testdata/threads). The guest's own /proc
// table, printed by /init, is the ground truth.

const offsetsInit = `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
echo 0 >/proc/sys/kernel/kptr_restrict
for m in /modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
echo KVMSCOPE-MODULES-BEGIN
cat /proc/modules
echo KVMSCOPE-MODULES-END
threads=4
for a in $(cat /proc/cmdline); do
	case $a in kvmscope_threads=*) threads=${a#kvmscope_threads=} ;; esac
done
umount /proc
# A background job's stdin is /dev/null.
/bin/kvm-threads $threads &
exec /init
`

// cpioFile is one entry of a newc archive.
type cpioFile struct {
	name string
	mode uint32
	data []byte
}

// writeCPIO writes a newc ("070701") archive, the format the kernel's
// initramfs unpacker reads (Documentation/driver-api/early-userspace/
// buffer-format.rst).
func writeCPIO(files []cpioFile) []byte {
	var b bytes.Buffer
	pad := func() {
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	entry := func(ino int, f cpioFile) {
		nlink := 1
		if f.mode&0o170000 == 0o040000 {
			nlink = 2
		}
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, f.mode, 0, 0, nlink, 0, len(f.data), 0, 0, 0, 0, len(f.name)+1, 0)
		b.WriteString(f.name)
		b.WriteByte(0)
		pad()
		b.Write(f.data)
		pad()
	}
	for i, f := range files {
		entry(i+1, f)
	}
	entry(0, cpioFile{name: "TRAILER!!!"})
	return b.Bytes()
}

// guestInitrd returns the path of the fetched initramfs with the extra
// archive appended, and the names of the modules it loads.
func guestInitrd(t testing.TB, p testlinux.Paths, withModules bool) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	threads := filepath.Join(dir, "kvm-threads")
	cmd := exec.Command("go", "build", "-o", threads, "./testdata/threads")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build testdata/threads: %v\n%s", err, out)
	}
	bin, err := os.ReadFile(threads)
	if err != nil {
		t.Fatal(err)
	}
	files := []cpioFile{
		{name: "init.kvmscope-offsets", mode: 0o100755, data: []byte(offsetsInit)},
		{name: "bin/kvm-threads", mode: 0o100755, data: bin},
		{name: "modules", mode: 0o040755},
	}
	var mods []string
	if withModules {
		kos, _ := filepath.Glob(filepath.Join(p.Dir, "debian", "modules", "*.ko"))
		for _, ko := range kos {
			data, err := os.ReadFile(ko)
			if err != nil {
				t.Fatal(err)
			}
			files = append(files, cpioFile{name: "modules/" + filepath.Base(ko), mode: 0o100644, data: data})
			mods = append(mods, strings.ReplaceAll(strings.TrimSuffix(filepath.Base(ko), ".ko"), "-", "_"))
		}
	}
	base, err := os.ReadFile(p.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	var extra bytes.Buffer
	zw := gzip.NewWriter(&extra)
	zw.Write(writeCPIO(files))
	zw.Close()
	out := filepath.Join(dir, "initrd.gz")
	// The kernel unpacks concatenated (separately compressed) archives
	// in order.
	if err := os.WriteFile(out, append(base, extra.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}
	return out, mods
}

// bootGuest boots kernel with the test initramfs; the caller closes it.
func bootGuest(t *testing.T, kernel func(testlinux.Paths) string, withModules bool) (*testlinux.Guest, []string) {
	t.Helper()
	p := testlinux.Require(t)
	initrd, mods := guestInitrd(t, p, withModules)
	g, err := testlinux.Boot(context.Background(), testlinux.Options{
		Kernel: kernel(p), Initrd: initrd, Append: "rdinit=/init.kvmscope-offsets", Timeout: 180 * time.Second,
	})
	if err != nil {
		t.Fatalf("boot %s: %v", kernel(p), err)
	}
	t.Logf("booted %s in %v", g.Release(), g.BootTime())
	return g, mods
}

// discoverLive pauses the guest and discovers its kernel through the live
// TCG memory source; the returned function resumes it.
func discoverLive(t *testing.T, g *testlinux.Guest) (*Kernel, func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := guestmem.DialQMP(ctx, g.SpareQMP())
	if err != nil {
		t.Fatalf("QMP: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	mem := guestmem.NewTCG(q, g.Pid, false)
	// A consistent snapshot: stop the vCPUs while the lists are walked.
	if _, err := g.QMP("stop", nil); err != nil {
		t.Fatalf("stop: %v", err)
	}
	resume := func() { g.QMP("cont", nil) }
	start := time.Now()
	k, err := Discover(mem, DiscoverOptions{})
	if err != nil {
		resume()
		t.Fatalf("Discover: %v", err)
	}
	t.Logf("discovered %s (BTF %v) in %v", k.Banner, k.BTF != nil, time.Since(start))
	return k, resume
}

// taskMembers are the members the solver must always find on the test
// guests (the module ones need loaded modules).
var taskMembers = []string{
	"task_struct.tasks", "task_struct.comm", "task_struct.pid", "task_struct.tgid",
	"task_struct.real_parent", "task_struct.parent", "task_struct.mm", "task_struct.real_cred",
	"task_struct.cred", "task_struct.flags", "task_struct.__state", "task_struct.start_time",
	"task_struct.signal", "task_struct.thread_node", "signal_struct.thread_head",
	"mm_struct.pgd", "mm_struct.arg_start", "mm_struct.arg_end",
	"cred.uid", "cred.gid", "cred.euid", "cred.egid",
}

var moduleMembers = []string{"module.list", "module.name", "module.state", "module.base", "module.size"}

func memberMap(o *Offsets) map[string]Offset {
	m := map[string]Offset{}
	for _, x := range o.Members() {
		m[x.Name] = x.Offset
	}
	return m
}

func requireSolved(t *testing.T, o *Offsets, names []string) {
	t.Helper()
	m := memberMap(o)
	for _, n := range names {
		if !m[n].Known() {
			t.Errorf("%s not solved", n)
		} else if m[n].Source != SourceSolved {
			t.Errorf("%s: source %q, want solved", n, m[n].Source)
		}
	}
}

// TestDebianGuest proves the solver against BTF on Debian's 6.1 cloud
// kernel and checks processes, threads, modules and the exports against
// the guest's own view.
func TestDebianGuest(t *testing.T) {
	g, mods := bootGuest(t, testlinux.Debian, true)
	defer g.Close()
	k, resume := discoverLive(t, g)
	defer resume()
	if k.BTF == nil {
		t.Fatal("the Debian kernel has BTF, but Discover found none")
	}
	guestMods := parseProcModules(t, g.Serial())
	if len(mods) > 0 && len(guestMods) != len(mods) {
		t.Fatalf("guest loaded %d modules, want %d (%v); serial:\n%s", len(guestMods), len(mods), mods, g.Serial())
	}

	start := time.Now()
	solved, solveErr := SolveOffsets(k)
	t.Logf("SolveOffsets: %v", time.Since(start))
	if solved == nil {
		t.Fatalf("SolveOffsets: %v", solveErr)
	}
	btfOff, err := FindOffsets(k)
	if err != nil {
		t.Fatalf("FindOffsets (BTF): %v", err)
	}

	t.Run("SolverMatchesBTF", func(t *testing.T) {
		want := taskMembers
		if len(guestMods) > 0 {
			want = append(append([]string(nil), taskMembers...), moduleMembers...)
		} else {
			t.Logf("no modules loaded (no %s/debian/modules/*.ko): module offsets not compared", testlinux.Require(t).Dir)
		}
		requireSolved(t, solved, want)
		if solveErr != nil && len(guestMods) > 0 {
			t.Errorf("SolveOffsets: %v", solveErr)
		}
		b := memberMap(btfOff)
		compared := 0
		for _, m := range solved.Members() {
			if !m.Known() {
				continue
			}
			bo := b[m.Name]
			if bo.Source != SourceBTF {
				t.Errorf("%s: BTF gave no offset (source %q)", m.Name, bo.Source)
				continue
			}
			compared++
			if m.Value != bo.Value {
				t.Errorf("%s: solved %d (%s), BTF %d (%s)", m.Name, m.Value, m.How, bo.Value, bo.How)
			}
		}
		t.Logf("%d offsets solved without BTF, all equal to BTF's", compared)
	})

	t.Run("ProcessesMatchGuest", func(t *testing.T) {
		for _, c := range []struct {
			name string
			off  *Offsets
		}{{"solved", solved}, {"btf", btfOff}} {
			start := time.Now()
			ps, err := k.Processes(c.off, ProcessOptions{})
			if err != nil {
				t.Fatalf("Processes (%s offsets): %v", c.name, err)
			}
			t.Logf("%s offsets: %d processes in %v", c.name, len(ps), time.Since(start))
			comparePS(t, ps, g.PS())
			checkThreads(t, k, c.off, ps)
		}
	})

	t.Run("Modules", func(t *testing.T) {
		for _, c := range []struct {
			name string
			off  *Offsets
		}{{"solved", solved}, {"btf", btfOff}} {
			ms, err := k.Modules(c.off)
			if err != nil {
				t.Fatalf("Modules (%s offsets): %v", c.name, err)
			}
			compareModules(t, ms, guestMods)
		}
	})

	t.Run("Export", func(t *testing.T) {
		checkExports(t, k, solved)
	})

	// The same guest from a dump (QEMU dump-guest-memory), still paused.
	t.Run("Dump", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "guest.core")
		if err := g.Dump(path); err != nil {
			t.Fatalf("dump: %v", err)
		}
		core, err := guestmem.OpenCore(path)
		if err != nil {
			t.Fatal(err)
		}
		defer core.Close()
		kd, err := Discover(core, DiscoverOptions{})
		if err != nil {
			t.Fatalf("Discover on the dump: %v", err)
		}
		off, err := SolveOffsets(kd)
		if off == nil {
			t.Fatalf("SolveOffsets on the dump: %v", err)
		}
		if !equalOffsets(off, solved) {
			t.Errorf("offsets from the dump differ from the live ones:\n%+v\n%+v", off, solved)
		}
		ps, err := kd.Processes(off, ProcessOptions{})
		if err != nil {
			t.Fatal(err)
		}
		comparePS(t, ps, g.PS())
		ms, err := kd.Modules(off)
		if err != nil {
			t.Fatal(err)
		}
		compareModules(t, ms, guestMods)
	})
}

// countingMem counts reads (benchmarks are single-goroutine).
type countingMem struct {
	guestmem.Memory
	reads int
}

func (m *countingMem) ReadAt(p []byte, gpa int64) (int, error) {
	m.reads++
	return m.Memory.ReadAt(p, gpa)
}

func equalOffsets(a, b *Offsets) bool {
	am, bm := a.Members(), b.Members()
	for i := range am {
		if am[i].Value != bm[i].Value || am[i].Known() != bm[i].Known() {
			return false
		}
	}
	return true
}

// BenchmarkProcesses measures a process listing of the paused Debian
// test guest through the live TCG memory source (the `ps` latency): ~100
// processes with and without command lines, the same with all ~5,100
// threads listed, the first contact (discovery, offsets and the first
// listing), and the solver.
func BenchmarkProcesses(b *testing.B) {
	p := testlinux.Require(b)
	// The test initramfs with a process of 5,000 threads: thousands of
	// tasks in little guest memory.
	initrd, _ := guestInitrd(b, p, false)
	g, err := testlinux.Boot(context.Background(), testlinux.Options{
		Kernel: p.DebianKernel, Initrd: initrd, Timeout: 300 * time.Second, MemMB: 1536,
		Append: "rdinit=/init.kvmscope-offsets kvmscope_threads=5000",
	})
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	for deadline := time.Now().Add(5 * time.Minute); !strings.Contains(g.Serial(), "KVMSCOPE-THREADS-READY"); {
		if time.Now().After(deadline) {
			b.Fatal("kvm-threads did not start its threads")
		}
		time.Sleep(time.Second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := guestmem.DialQMP(ctx, g.SpareQMP())
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	mem := &countingMem{Memory: guestmem.NewTCG(q, g.Pid, false)}
	g.QMP("stop", nil)
	defer g.QMP("cont", nil)
	firstContact := func() (*Kernel, *Offsets) {
		k, err := Discover(mem, DiscoverOptions{})
		if err != nil {
			b.Fatal(err)
		}
		off, err := FindOffsets(k)
		if off == nil {
			b.Fatal(err)
		}
		if _, err := k.Processes(off, ProcessOptions{NoCmdline: true}); err != nil {
			b.Fatal(err)
		}
		return k, off
	}
	k, off := firstContact()
	b.Run("FirstContact", func(b *testing.B) {
		for b.Loop() {
			firstContact()
		}
	})
	for _, c := range []struct {
		name string
		opts ProcessOptions
	}{{"NoCmdline", ProcessOptions{NoCmdline: true}}, {"Cmdline", ProcessOptions{}}, {"Threads", ProcessOptions{Threads: true, NoCmdline: true}}} {
		b.Run(c.name, func(b *testing.B) {
			n := 0
			mem.reads = 0
			for b.Loop() {
				ps, err := k.Processes(off, c.opts)
				if err != nil {
					b.Fatal(err)
				}
				n = len(ps)
			}
			b.ReportMetric(float64(n), "procs")
			// Each read of live memory is a system call: this count
			// does not depend on the machine's load.
			b.ReportMetric(float64(mem.reads)/float64(b.N), "reads/op")
		})
	}
	b.Run("Solve", func(b *testing.B) {
		for b.Loop() {
			if off, _ := SolveOffsets(k); off == nil || !off.TaskPID.Known() {
				b.Fatal("solve failed")
			}
		}
	})
}

// TestGokrazyGuest checks the solver on a 7.x kernel without BTF: every
// task member solved, processes as the guest lists them.
func TestGokrazyGuest(t *testing.T) {
	g, _ := bootGuest(t, testlinux.Gokrazy, false)
	defer g.Close()
	k, resume := discoverLive(t, g)
	defer resume()
	if k.BTF != nil {
		t.Log("gokrazy kernel unexpectedly has BTF; solving anyway")
	}
	start := time.Now()
	off, err := FindOffsets(k)
	t.Logf("FindOffsets (no BTF): %v", time.Since(start))
	if off == nil {
		t.Fatalf("FindOffsets: %v", err)
	}
	if err != nil {
		t.Logf("partial: %v", err)
	}
	requireSolved(t, off, taskMembers)
	ps, err := k.Processes(off, ProcessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	comparePS(t, ps, g.PS())
	checkThreads(t, k, off, ps)
	ms, err := k.Modules(off)
	if err != nil {
		t.Fatalf("Modules: %v", err)
	}
	compareModules(t, ms, parseProcModules(t, g.Serial()))
}

func checkExports(t *testing.T, k *Kernel, off *Offsets) {
	cfg := off.LibVMI(k, "testguest")
	for _, want := range []string{
		"testguest {", `ostype = "Linux";`,
		fmt.Sprintf("linux_tasks = %#x;", off.TaskTasks.Value),
		fmt.Sprintf("linux_name = %#x;", off.TaskComm.Value),
		fmt.Sprintf("linux_pid = %#x;", off.TaskPID.Value),
		fmt.Sprintf("linux_mm = %#x;", off.TaskMM.Value),
		fmt.Sprintf("linux_pgd = %#x;", off.MMPgd.Value),
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("LibVMI config lacks %q:\n%s", want, cfg)
		}
	}
	raw, err := off.ISF(k)
	if err != nil {
		t.Fatal(err)
	}
	var isf struct {
		Metadata struct {
			Format   string
			Producer struct{ Version string }
		}
		UserTypes map[string]struct {
			Size   int64
			Fields map[string]struct{ Offset int64 }
		} `json:"user_types"`
		Symbols map[string]struct {
			Address      uint64
			ConstantData []byte `json:"constant_data"`
		}
	}
	if err := json.Unmarshal(raw, &isf); err != nil {
		t.Fatalf("ISF: %v", err)
	}
	// volatility3/schemas/schema-6.3.0.json patterns.
	if !regexp.MustCompile(`^6\.[0-9]+\.[0-9]+$`).MatchString(isf.Metadata.Format) ||
		!regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+$`).MatchString(isf.Metadata.Producer.Version) {
		t.Errorf("ISF metadata %+v does not match the schema", isf.Metadata)
	}
	if got := string(isf.Symbols["linux_banner"].ConstantData); got != k.Banner+"\n\x00" {
		t.Errorf("ISF linux_banner data %q, want the banner", got)
	}
	if got := isf.UserTypes["task_struct"].Fields["pid"].Offset; got != off.TaskPID.Value {
		t.Errorf("ISF task_struct.pid = %d, want %d", got, off.TaskPID.Value)
	}
	if got := isf.UserTypes["cred"].Fields["uid"].Offset; got != off.CredUID.Value {
		t.Errorf("ISF cred.uid = %d, want %d", got, off.CredUID.Value)
	}
	if k.BTF != nil {
		if sz, _ := k.btfStructSize("task_struct"); isf.UserTypes["task_struct"].Size != int64(sz) {
			t.Errorf("ISF task_struct size %d, BTF %d", isf.UserTypes["task_struct"].Size, sz)
		}
	}
	it, _ := k.Symbol("init_task")
	if got := isf.Symbols["init_task"].Address; int64(got) != int64(it)-k.KASLRShift {
		t.Errorf("ISF init_task %#x, want %#x (link-time)", got, int64(it)-k.KASLRShift)
	}
	js, err := off.JSON(k)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Offsets map[string]Offset
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Offsets["task_struct.comm"] != off.TaskComm {
		t.Errorf("JSON comm %+v, want %+v", doc.Offsets["task_struct.comm"], off.TaskComm)
	}
}
