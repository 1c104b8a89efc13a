package testguest_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

const qemuBinary = "qemu-system-x86_64"

// needQEMUKVM builds the guest and runs the test only where QEMU and KVM
// are (the gate defers it to the nested-KVM lab otherwise, where the guest
// comes prebuilt).
func needQEMUKVM(t *testing.T) string {
	t.Helper()
	testenv.Require(t, testenv.QEMU, testenv.KVM)
	kernel, err := testguest.Build()
	if err != nil {
		t.Fatalf("build tiny guest: %v", err)
	}
	return kernel
}

// runningGuest is QEMU running the tiny guest with a QMP socket.
type runningGuest struct {
	cmd     *exec.Cmd
	q       *monitor
	stderr  *bytes.Buffer
	started time.Time
	exited  chan struct{}
}

func boot(t *testing.T, kernel string, smp int, cmdline string) *runningGuest {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "qmp.sock")
	args := append(testguest.KernelArgs(kernel, smp, "kvm", cmdline),
		"-qmp", "unix:"+sock+",server=on,wait=off")
	g := &runningGuest{cmd: exec.Command(qemuBinary, args...), stderr: new(bytes.Buffer), exited: make(chan struct{})}
	g.cmd.Stderr = g.stderr
	g.started = time.Now()
	if err := g.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", qemuBinary, err)
	}
	go func() { g.cmd.Wait(); close(g.exited) }()
	t.Cleanup(func() {
		if g.q != nil {
			g.q.do("quit", nil)
			g.q.Close()
		}
		select {
		case <-g.exited:
		case <-time.After(5 * time.Second):
			g.cmd.Process.Kill()
			<-g.exited
		}
	})
	q, err := dialMonitor(sock, dir)
	if err != nil {
		t.Fatalf("%v; QEMU stderr: %s", err, g.stderr)
	}
	g.q = q
	return g
}

func (g *runningGuest) u64(t *testing.T, gpa uint64) uint64 {
	t.Helper()
	b, err := g.q.physRead(gpa, 8)
	if err != nil {
		t.Fatalf("read %#x: %v", gpa, err)
	}
	return binary.LittleEndian.Uint64(b)
}

// waitReady polls ReadyGPA until the guest publishes ReadyValue and returns
// the time since QEMU started.
func (g *runningGuest) waitReady(t *testing.T, timeout time.Duration) time.Duration {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if v := g.u64(t, testguest.ReadyGPA); v == testguest.ReadyValue {
			return time.Since(g.started)
		} else if time.Now().After(deadline) {
			regs, _ := g.q.hmp("info registers")
			t.Fatalf("guest not ready after %v: [%#x] = %#x, want %#x\n%s", timeout, testguest.ReadyGPA, v, uint64(testguest.ReadyValue), regs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// cpuRegs are the registers of one vCPU as HMP "info registers -a" shows them.
type cpuRegs struct {
	index         int
	rip, cr0, cr3 uint64
	efer          uint64
	cs64, halted  bool
	raw           string
}

var (
	cpuHeader = regexp.MustCompile(`(?m)^CPU#(\d+)$`)
	regField  = regexp.MustCompile(`\b(RIP|EIP|CR0|CR3|EFER)=([0-9a-f]+)`)
)

func parseRegisters(out string) ([]cpuRegs, error) {
	out = strings.ReplaceAll(out, "\r\n", "\n")
	locs := cpuHeader.FindAllStringSubmatchIndex(out, -1)
	if len(locs) == 0 {
		return nil, fmt.Errorf("no CPU#N header in %q", out)
	}
	var cpus []cpuRegs
	for i, loc := range locs {
		end := len(out)
		if i+1 < len(locs) {
			end = locs[i+1][0]
		}
		idx, _ := strconv.Atoi(out[loc[2]:loc[3]])
		c := cpuRegs{index: idx, raw: out[loc[0]:end]}
		for _, m := range regField.FindAllStringSubmatch(c.raw, -1) {
			v, err := strconv.ParseUint(m[2], 16, 64)
			if err != nil {
				return nil, fmt.Errorf("CPU#%d %s=%s: %w", idx, m[1], m[2], err)
			}
			switch m[1] {
			case "RIP", "EIP":
				c.rip = v
			case "CR0":
				c.cr0 = v
			case "CR3":
				c.cr3 = v
			case "EFER":
				c.efer = v
			}
		}
		c.cs64 = strings.Contains(c.raw, "CS64")
		c.halted = strings.Contains(c.raw, "HLT=1")
		cpus = append(cpus, c)
	}
	return cpus, nil
}

// TestBoot boots the guest under KVM with one and four vCPUs and checks,
// through QEMU's own monitor, everything kvmscope's tests rely on.
func TestBoot(t *testing.T) {
	kernel := needQEMUKVM(t)
	for _, smp := range []int{1, 4} {
		t.Run(fmt.Sprintf("smp%d", smp), func(t *testing.T) {
			g := boot(t, kernel, smp, "")
			t.Logf("ready %v after QEMU start", g.waitReady(t, 60*time.Second).Round(time.Millisecond))

			t.Run("vcpus", func(t *testing.T) {
				r, err := g.q.do("query-cpus-fast", nil)
				if err != nil {
					t.Fatal(err)
				}
				var cpus []struct {
					Index int `json:"cpu-index"`
				}
				if err := json.Unmarshal(r, &cpus); err != nil {
					t.Fatal(err)
				}
				if len(cpus) != smp {
					t.Fatalf("%d vCPUs, want %d", len(cpus), smp)
				}
				for i, c := range cpus {
					if c.Index != i {
						t.Errorf("vCPU %d has cpu-index %d", i, c.Index)
					}
				}
			})

			t.Run("status", func(t *testing.T) {
				if v := g.u64(t, testguest.BootMagicGPA) & 0xffffffff; v != testguest.MultibootBootMagic {
					t.Errorf("boot magic %#x, want %#x (not booted through multiboot?)", v, testguest.MultibootBootMagic)
				}
				if v := g.u64(t, testguest.ModeGPA); v != testguest.ModeSpin {
					t.Errorf("mode %d, want %d (spin)", v, testguest.ModeSpin)
				}
				if v := g.u64(t, testguest.CmdlineGPA); v < testguest.ImageEnd || v >= testguest.MemoryMiB<<20 {
					t.Errorf("command line at %#x, want after the image (%#x) in RAM", v, testguest.ImageEnd)
				}
			})

			t.Run("pattern", func(t *testing.T) {
				got, err := g.q.physRead(testguest.PatternGPA, testguest.PatternPages*testguest.PageSize)
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < testguest.PatternPages; i++ {
					page := got[i*testguest.PageSize : (i+1)*testguest.PageSize]
					if want := testguest.PatternFor(i); !bytes.Equal(page, want) {
						t.Errorf("page %d at %#x: got %q..., want %q...", i, testguest.PatternGPA+i*testguest.PageSize, page[:64], want[:64])
					}
				}
				// The page after the pattern is untouched RAM.
				after, err := g.q.physRead(testguest.PatternGPA+testguest.PatternPages*testguest.PageSize, 64)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(after, make([]byte, 64)) {
					t.Errorf("page after the pattern is not zero: %q", after)
				}
			})

			t.Run("pagetables", func(t *testing.T) {
				// QEMU walks vCPU 0's page tables for memsave: the
				// high mapping reaches the pattern pages, page 0 is
				// not mapped.
				for _, i := range []int{0, testguest.PatternPages - 1} {
					b, err := g.q.virtRead(0, testguest.PatternVA+uint64(i)*testguest.PageSize, testguest.PageSize)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(b, testguest.PatternFor(i)) {
						t.Errorf("VA %#x: got %q..., want pattern page %d", testguest.PatternVA+uint64(i)*testguest.PageSize, b[:64], i)
					}
				}
				if _, err := g.q.virtRead(0, 0, 8); err == nil {
					t.Errorf("VA 0 readable, want it not present")
				}
			})

			t.Run("counter", func(t *testing.T) {
				// Polled, not one fixed sleep: on a loaded 2-core
				// machine the vCPU thread may wait a while for a core.
				c1 := g.u64(t, testguest.CounterGPA)
				start := time.Now()
				for {
					time.Sleep(50 * time.Millisecond)
					c2 := g.u64(t, testguest.CounterGPA)
					if c2 > c1 {
						t.Logf("counter %d -> %d in %v", c1, c2, time.Since(start).Round(time.Millisecond))
						break
					}
					if time.Since(start) > 10*time.Second {
						t.Fatalf("counter did not advance in %v: %d then %d", time.Since(start), c1, c2)
					}
				}
			})

			t.Run("registers", func(t *testing.T) {
				out, err := g.q.hmp("info registers -a")
				if err != nil {
					t.Fatal(err)
				}
				cpus, err := parseRegisters(out)
				if err != nil {
					t.Fatal(err)
				}
				if len(cpus) != smp {
					t.Fatalf("registers of %d vCPUs, want %d", len(cpus), smp)
				}
				bsp := cpus[0]
				if bsp.index != 0 || bsp.cr3 != testguest.PML4GPA {
					t.Errorf("CPU#%d CR3=%#x, want %#x", bsp.index, bsp.cr3, testguest.PML4GPA)
				}
				if bsp.rip < testguest.CodeStart || bsp.rip >= testguest.CodeEnd {
					t.Errorf("CPU#0 RIP=%#x outside [%#x, %#x)", bsp.rip, testguest.CodeStart, testguest.CodeEnd)
				}
				const eferLMA, cr0PG = 1 << 10, 1 << 31
				if bsp.efer&eferLMA == 0 || bsp.cr0&cr0PG == 0 || !bsp.cs64 {
					t.Errorf("CPU#0 not in 64-bit mode: EFER=%#x CR0=%#x CS64=%v", bsp.efer, bsp.cr0, bsp.cs64)
				}
				// Application processors stay in wait-for-SIPI: real
				// mode, no paging.
				for _, ap := range cpus[1:] {
					if ap.cr0&1 != 0 || ap.cr3 != 0 {
						t.Errorf("AP CPU#%d CR0=%#x CR3=%#x, want reset state", ap.index, ap.cr0, ap.cr3)
					}
				}
				if t.Failed() {
					t.Logf("%s", out)
				}
			})
		})
	}
}

// TestExit checks the exit=N and io=N modes end QEMU with the documented
// status.
func TestExit(t *testing.T) {
	kernel := needQEMUKVM(t)
	cases := []struct {
		cmdline string
		status  int
	}{
		{"exit=5", 11},
		{"exit=0", 1},
		{"console=none exit=127 quiet", 255},
		{"io=1000", 1},
		{"io=0", 1},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.cmdline, " ", "_"), func(t *testing.T) {
			if want := testguest.ExitStatus(ptoi(c.cmdline)); want != c.status {
				t.Fatalf("ExitStatus(%s) = %d, test wants %d", c.cmdline, want, c.status)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, qemuBinary, testguest.KernelArgs(kernel, 1, "kvm", c.cmdline)...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			start := time.Now()
			err := cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("QEMU exited with %v, want status %d; stderr: %s", err, c.status, &stderr)
			}
			if got := ee.ExitCode(); got != c.status {
				t.Fatalf("QEMU exit status %d, want %d; stderr: %s", got, c.status, &stderr)
			}
			t.Logf("%q: status %d after %v", c.cmdline, c.status, time.Since(start).Round(time.Millisecond))
		})
	}
}

// ptoi is the N of exit=N, or 0 for io=N (which exits with 0).
func ptoi(cmdline string) int {
	for _, w := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(w, "exit="); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

// TestBuildConcurrent: concurrent Build calls agree.
func TestBuildConcurrent(t *testing.T) {
	testenv.Require(t, testenv.Binutils)
	var wg sync.WaitGroup
	paths := make([]string, 4)
	errs := make([]error, 4)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = testguest.Build()
		}()
	}
	wg.Wait()
	for i := range paths {
		if errs[i] != nil {
			t.Fatalf("Build: %v", errs[i])
		}
		if paths[i] != paths[0] {
			t.Fatalf("Build returned %q and %q", paths[0], paths[i])
		}
	}
	if args := testguest.QEMUArgs(2, "kvm", "exit=3"); !containsSeq(args, "-kernel", paths[0]) || !containsSeq(args, "-append", "exit=3") || !containsSeq(args, "-smp", "2") {
		t.Errorf("QEMUArgs = %q", args)
	}
}

func containsSeq(args []string, a, b string) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == a && args[i+1] == b {
			return true
		}
	}
	return false
}

// BenchmarkIOExits measures QEMU's wall time for io=N against io=0 and
// reports the cost of one port-I/O exit (guest instructions included).
func BenchmarkIOExits(b *testing.B) {
	testenv.Require(b, testenv.QEMU, testenv.KVM)
	kernel, err := testguest.Build()
	if err != nil {
		b.Fatal(err)
	}
	run := func(cmdline string) time.Duration {
		start := time.Now()
		err := exec.Command(qemuBinary, testguest.KernelArgs(kernel, 1, "kvm", cmdline)...).Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != testguest.ExitStatus(0) {
			b.Fatalf("QEMU %s: %v", cmdline, err)
		}
		return time.Since(start)
	}
	const n = 20000
	var base, io time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		base += run("io=0")
		io += run(fmt.Sprintf("io=%d", n))
	}
	b.ReportMetric(float64((io-base).Nanoseconds())/float64(b.N*n), "ns/ioexit")
	b.ReportMetric(float64(base.Nanoseconds())/float64(b.N)/1e6, "ms/boot")
}
