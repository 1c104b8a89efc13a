package api

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/kvmscope/kvmscope/guestmem"
)

// Hex64 is a 64-bit value that encodes in JSON as a hex string such as
// "0xffffffff81000000": JSON numbers lose precision above 2^53.
type Hex64 uint64

// MarshalText makes a Hex64 a JSON string: a text marshaler, unlike a
// JSON one, needs no validation of its output by encoding/json (a process
// list holds 10,000 of them).
func (h Hex64) MarshalText() ([]byte, error) {
	return strconv.AppendUint([]byte("0x"), uint64(h), 16), nil
}

func (h *Hex64) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	v, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		return fmt.Errorf("bad hex value %q", s)
	}
	*h = Hex64(v)
	return nil
}

// VM is the reply of GET /v1/vm.
type VM struct {
	Name string `json:"name,omitempty"`
	Pid  int    `json:"pid"`
	// TracerPid is the kvmscope process that traces QEMU and serves this API.
	TracerPid int `json:"tracer_pid"`
	// AnalysisPid is the kvmscope process that serves this API when it is
	// not the tracer's (under run: the tracer keeps QEMU, this one parses
	// guest memory, docs/how-it-works.md).
	AnalysisPid int         `json:"analysis_pid,omitempty"`
	Accel       string      `json:"accel"` // "kvm" or "tcg"
	Writable    bool        `json:"writable"`
	VCPUs       []VCPUInfo  `json:"vcpus"`
	Memslots    []Memslot   `json:"memslots,omitempty"` // KVM only
	Regions     []RegionOut `json:"regions"`
	// Source is what the memory source that scans read can do, as the
	// scans see it (batched reads, writes, RAM read in place).
	Source *Capabilities `json:"source,omitempty"`
}

// Health is GET /v1/health: the serving process is alive and answering.
type Health struct {
	OK bool `json:"ok"`
	// Pid is the process that answered (under run, the analysis process).
	Pid int `json:"pid"`
	// UpNs is how long it has served.
	UpNs int64 `json:"up_ns"`
}

// Capabilities are a memory source's (guestmem.Capabilities), for the API.
type Capabilities struct {
	Batch   bool        `json:"batch"`
	Write   bool        `json:"write"`
	InPlace []RegionOut `json:"in_place,omitempty"`
}

// VCPUInfo names one vCPU and the QEMU thread that runs it.
type VCPUInfo struct {
	ID  int `json:"id"`
	TID int `json:"tid,omitempty"`
}

// Memslot is one KVM memslot.
type Memslot struct {
	Slot         uint32 `json:"slot"`
	AddressSpace int    `json:"address_space"`
	GPA          Hex64  `json:"gpa"`
	Size         Hex64  `json:"size"`
	HVA          Hex64  `json:"hva"`
	Flags        uint32 `json:"flags"`
	ReadOnly     bool   `json:"readonly"`
	DirtyLog     bool   `json:"dirty_log"`
	// Memfd is set when kvmscope reads the slot through its own read-only
	// mapping of QEMU's memfd (no system call per read).
	Memfd bool `json:"memfd,omitempty"`
}

// RegionOut is one range of guest physical memory.
type RegionOut struct {
	GPA      Hex64  `json:"gpa"`
	Size     Hex64  `json:"size"`
	ReadOnly bool   `json:"readonly,omitempty"`
	Name     string `json:"name,omitempty"`
}

// VCPU is one element of GET /v1/vcpus.
type VCPU struct {
	ID     int    `json:"id"`
	Mode   string `json:"mode"`
	RIP    Hex64  `json:"rip"`
	RSP    Hex64  `json:"rsp"`
	RFLAGS Hex64  `json:"rflags"`
	CR0    Hex64  `json:"cr0"`
	CR2    Hex64  `json:"cr2"`
	CR3    Hex64  `json:"cr3"`
	CR4    Hex64  `json:"cr4"`
	EFER   Hex64  `json:"efer"`
	CSBase Hex64  `json:"cs_base"`
	DSBase Hex64  `json:"ds_base"`
	SSBase Hex64  `json:"ss_base"`
	FSBase Hex64  `json:"fs_base"`
	GSBase Hex64  `json:"gs_base"`
}

// VCPUFrom converts registers for the API.
func VCPUFrom(c guestmem.CPU) VCPU {
	return VCPU{
		ID: c.ID, Mode: c.Mode(), RIP: Hex64(c.RIP), RSP: Hex64(c.RSP), RFLAGS: Hex64(c.RFLAGS),
		CR0: Hex64(c.CR0), CR2: Hex64(c.CR2), CR3: Hex64(c.CR3), CR4: Hex64(c.CR4), EFER: Hex64(c.EFER),
		CSBase: Hex64(c.CSBase), DSBase: Hex64(c.DSBase), SSBase: Hex64(c.SSBase), FSBase: Hex64(c.FSBase), GSBase: Hex64(c.GSBase),
	}
}

// Error is the body of every 4xx/5xx reply.
type Error struct {
	Error string `json:"error"`
}
