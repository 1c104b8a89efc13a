package api

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/session"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// ramTarget is a VM whose guest memory is a byte slice at GPA 0 (a real
// guestmem.Memory over host memory; the server and its metrics are what is
// tested here).
type ramTarget struct {
	ram []byte
}

func (r *ramTarget) Describe() VM {
	return VM{Name: "ram", Accel: "tcg", VCPUs: []VCPUInfo{{ID: 0}, {ID: 1}},
		Regions: []RegionOut{{GPA: 0, Size: Hex64(len(r.ram)), Name: "ram"}}}
}

// session reads the target's RAM as the server does.
func (r *ramTarget) session() *session.Session {
	return session.New(session.Frozen{Src: ramSource{r.ram}}, nil)
}

type ramSource struct{ ram []byte }

func (s ramSource) ReadAt(p []byte, gpa int64) (int, error) {
	if gpa < 0 || gpa+int64(len(p)) > int64(len(s.ram)) {
		return 0, &guestmem.HoleError{GPA: uint64(gpa)}
	}
	return copy(p, s.ram[gpa:]), nil
}

func (s ramSource) Regions() []guestmem.Region {
	return []guestmem.Region{{GPA: 0, Size: uint64(len(s.ram)), Name: "ram"}}
}

func (s ramSource) CPUs(context.Context) ([]guestmem.CPU, error) { return nil, nil }

func TestMetricsEndpoint(t *testing.T) {
	target := &ramTarget{ram: make([]byte, 1<<20)}
	sock := filepath.Join(t.TempDir(), "api.sock")
	s := &Server{Target: target, Session: target.session(), Log: zerolog.Nop()}
	if err := s.Listen(sock); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := NewClient(sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for i := 0; i < 3; i++ {
		if _, err := c.GetRaw(ctx, "/v1/memory?gpa=0x1000&len=4096"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.GetRaw(ctx, fmt.Sprintf("/v1/memory?gpa=%#x&len=16", 2<<20)); err == nil {
		t.Fatal("read of a hole succeeded")
	}
	c.GetRaw(ctx, "/v1/no-such-thing")
	text, err := c.GetRaw(ctx, "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`kvmscope_api_requests_total{code="200",path="/v1/memory"} 3`,
		`kvmscope_api_requests_total{code="404",path="/v1/memory"} 1`,
		// Unknown paths share one label value: clients cannot grow the
		// label set.
		`kvmscope_api_requests_total{code="404",path="/"} 1`,
		`kvmscope_api_request_duration_seconds_count{path="/v1/memory"} 4`,
		"kvmscope_guest_memory_read_bytes_total 12288",
		// The hole's read counts as a call.
		"kvmscope_guest_memory_reads_total 4",
		`kvmscope_errors_total{kind="memory_read"} 1`,
		"kvmscope_vcpus 2",
		"kvmscope_guest_memory_bytes 1.048576e+06",
		"go_goroutines",
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// RAM of zeros holds no kernel: the scan fails, and counts so.
	if _, err := c.GetRaw(ctx, "/v1/processes"); err == nil {
		t.Fatal("a scan of RAM without a kernel succeeded")
	}
	text, _ = c.GetRaw(ctx, "/metrics")
	for _, want := range []string{
		`kvmscope_scans_total{kind="processes",result="error"} 1`,
		`kvmscope_scan_duration_seconds_count{kind="processes"} 1`,
		`kvmscope_scan_reads_count{kind="processes"} 1`,
		`kvmscope_errors_total{kind="scan"} 1`,
		`kvmscope_api_requests_total{code="422",path="/v1/processes"} 1`,
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// TestSocketModeWithGroups: with allowed groups the socket is 0660 and
// belongs to the first group.
func TestSocketModeWithGroups(t *testing.T) {
	gid := os.Getegid()
	sock := filepath.Join(t.TempDir(), "api.sock")
	target := &ramTarget{ram: make([]byte, 4096)}
	s := &Server{Target: target, Session: target.session(), Log: zerolog.Nop(), Groups: []int{gid}}
	if err := s.Listen(sock); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var st unix.Stat_t
	if err := unix.Stat(sock, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o660 || int(st.Gid) != gid {
		t.Errorf("socket mode %o gid %d, want 0660 and %d", st.Mode&0o777, st.Gid, gid)
	}
}

func TestProcGroups(t *testing.T) {
	got, err := procGroups(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.Getgroups()
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("procGroups = %v, want getgroups %v", got, want)
	}
	if peerInGroups(&unix.Ucred{Pid: int32(os.Getpid()), Uid: 12345, Gid: 12345}, nil) {
		t.Error("no groups configured, yet a peer was let in")
	}
	if !peerInGroups(&unix.Ucred{Pid: int32(os.Getpid()), Uid: 12345, Gid: 777}, []int{777}) {
		t.Error("peer whose primary gid is allowed was refused")
	}
	if len(want) > 0 && !peerInGroups(&unix.Ucred{Pid: int32(os.Getpid()), Uid: 12345, Gid: 12345}, []int{want[0]}) {
		t.Error("peer with an allowed supplementary group was refused")
	}
	if _, err := procGroups(0); err == nil {
		t.Error("pid 0 accepted")
	}
}
