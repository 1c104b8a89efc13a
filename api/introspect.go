package api

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/session"
)

// Kernel is the reply of GET /v1/kernel.
type Kernel struct {
	Banner         string              `json:"banner"`
	Version        string              `json:"version"`
	PhysBase       Hex64               `json:"phys_base"`
	TextVA         Hex64               `json:"text_va"`
	KASLRShift     Hex64               `json:"kaslr_shift"`
	PGD            Hex64               `json:"pgd"`
	PageOffsetBase Hex64               `json:"page_offset_base"`
	VmemmapBase    Hex64               `json:"vmemmap_base"`
	VmallocBase    Hex64               `json:"vmalloc_base"`
	PagingLevels   int                 `json:"paging_levels"`
	BTF            bool                `json:"btf"`
	Symbols        int                 `json:"symbols"`
	Found          map[string]string   `json:"found,omitempty"`
	Offsets        []introspect.Member `json:"offsets"`
	Unsolved       string              `json:"unsolved,omitempty"`
}

// KernelFrom describes a discovered kernel.
func KernelFrom(k *introspect.Kernel, off *introspect.Offsets, offErr error) Kernel {
	out := Kernel{
		Banner: k.Banner, Version: k.Version.String(), PhysBase: Hex64(k.PhysBase), TextVA: Hex64(k.TextVA),
		KASLRShift: Hex64(uint64(k.KASLRShift)), PGD: Hex64(k.PGD), PageOffsetBase: Hex64(k.PageOffsetBase),
		VmemmapBase: Hex64(k.VmemmapBase), VmallocBase: Hex64(k.VmallocBase), PagingLevels: k.Levels,
		BTF: k.BTF != nil, Found: k.Found, Offsets: off.Members(),
	}
	if k.Syms != nil {
		out.Symbols = k.Syms.Len()
	}
	if offErr != nil {
		out.Unsolved = offErr.Error()
	}
	return out
}

// Process is one element of GET /v1/processes: introspect.Process with
// addresses as hex strings.
type Process struct {
	introspect.Process
	PGD  Hex64 `json:"pgd,omitempty"`
	Task Hex64 `json:"task"`
}

// ProcessesFrom converts a scan for the API.
func ProcessesFrom(ps []introspect.Process) []Process {
	out := make([]Process, len(ps))
	for i, p := range ps {
		out[i] = Process{Process: p, PGD: Hex64(p.PGD), Task: Hex64(p.Task)}
	}
	return out
}

// Module is one element of GET /v1/modules.
type Module struct {
	Name  string `json:"name"`
	Base  Hex64  `json:"base"`
	Size  uint64 `json:"size"`
	State string `json:"state,omitempty"`
	Addr  Hex64  `json:"addr"`
}

// ModulesFrom converts modules for the API.
func ModulesFrom(ms []introspect.Module) []Module {
	out := make([]Module, len(ms))
	for i, m := range ms {
		out[i] = Module{Name: m.Name, Base: Hex64(m.Base), Size: m.Size, State: m.State, Addr: Hex64(m.Addr)}
	}
	return out
}

func (s *Server) introspectRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/kernel", s.withSession(s.getKernel))
	mux.HandleFunc("GET /v1/processes", s.withSession(s.getProcesses))
	mux.HandleFunc("GET /v1/modules", s.withSession(s.getModules))
	mux.HandleFunc("GET /v1/integrity", s.withSession(s.getIntegrity))
	mux.HandleFunc("POST /v1/integrity/restore", s.withSession(s.postRestore))
	mux.HandleFunc("GET /v1/offsets", s.withSession(s.getOffsets))
	mux.HandleFunc("GET /v1/dump", s.getDump)
}

// scanFunc is the body of a handler that reads the guest kernel.
type scanFunc func(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error

// withSession bounds the work to 30 s, and turns the body's error into a
// 4xx/5xx reply.
func (s *Server) withSession(body scanFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		if err := body(ctx, s.Session, w, r); err != nil {
			var bad badRequest
			var forbid forbidden
			status := http.StatusUnprocessableEntity
			switch {
			case errors.As(err, &bad):
				status = http.StatusBadRequest
			case errors.As(err, &forbid):
				status = http.StatusForbidden
			case errors.Is(err, context.DeadlineExceeded):
				status = http.StatusGatewayTimeout
			case errors.Is(err, session.ErrNotWritable):
				status = http.StatusForbidden
			}
			httpError(w, status, err.Error())
		}
	}
}

// badRequest marks an error in the request itself.
type badRequest struct{ error }

func (s *Server) getKernel(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	k, off, offErr, err := sess.Kernel(ctx)
	if err != nil {
		return err
	}
	writeJSON(w, KernelFrom(k, off, offErr))
	return nil
}

// Headers of GET /v1/processes: what the scan read of guest memory and
// how long it took, for clients that measure (just bench).
const (
	HeaderScanReadBytes = "Kvmscope-Scan-Read-Bytes"
	HeaderScanReads     = "Kvmscope-Scan-Reads"
	HeaderScanDuration  = "Kvmscope-Scan-Duration-Ns"
	// HeaderWarning is one per warning of a partial scan (a damaged
	// list: the processes read before the break are the reply).
	HeaderWarning = "Kvmscope-Warning"
)

func (s *Server) getProcesses(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	scan := sess.Latest()
	if q.Get("cached") != "1" || q.Get("threads") == "1" || scan == nil {
		var err error
		scan, err = sess.Processes(ctx, introspect.ProcessOptions{Threads: q.Get("threads") == "1"}, q.Get("consistent") == "1")
		if err != nil {
			return err
		}
	}
	h := w.Header()
	h.Set(HeaderScanReadBytes, strconv.FormatInt(scan.ReadBytes, 10))
	h.Set(HeaderScanReads, strconv.FormatInt(scan.Reads, 10))
	h.Set(HeaderScanDuration, strconv.FormatInt(scan.Duration.Nanoseconds(), 10))
	setWarnings(h, scan.Warnings)
	writeProcesses(w, scan.Processes)
	return nil
}

// writeProcesses streams ps as a JSON array, one element at a time
// through a buffer, rather than building the whole reply in memory: one
// element a line, so that `kvmscope ps --json` passes it on as it comes.
func writeProcesses(w http.ResponseWriter, ps []introspect.Process) {
	w.Header().Set("Content-Type", "application/json")
	WriteProcesses(w, ps)
}

// WriteProcesses writes ps as GET /v1/processes does: a JSON array, one
// process a line.
func WriteProcesses(w io.Writer, ps []introspect.Process) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	var elem []byte
	bw.WriteString("[")
	for i := range ps {
		if i > 0 {
			bw.WriteString(",")
		}
		bw.WriteString("\n")
		elem = appendProcess(elem[:0], &ps[i])
		bw.Write(elem)
	}
	bw.WriteString("\n]\n")
	return bw.Flush()
}

// getIntegrity checks the guest's system-call dispatch against the
// kernel's own rules and the baseline kept next to the socket.
func (s *Server) getIntegrity(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	in, err := sess.Integrity(ctx, s.BaselinePath)
	if err != nil {
		return err
	}
	writeJSON(w, in)
	return nil
}

// postRestore writes the baseline back over what changed (only with
// --allow-write), with the guest paused, and returns what it restored.
func (s *Server) postRestore(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	restored, err := sess.RestoreDispatch(ctx, s.BaselinePath)
	if err != nil {
		return err
	}
	if restored == nil {
		restored = []introspect.Deviation{}
	}
	s.Log.Warn().Int("restored", len(restored)).Msg("dispatch restored from the baseline")
	writeJSON(w, restored)
	return nil
}

func (s *Server) getModules(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	ms, err := sess.Modules(ctx)
	var damage *introspect.PartialError
	if errors.As(err, &damage) {
		// What was read before the break is the reply.
		setWarnings(w.Header(), damage.Warnings)
	} else if err != nil {
		return err
	}
	writeJSON(w, ModulesFrom(ms))
	return nil
}

// setWarnings puts the warnings of a partial reply in its headers, one
// HeaderWarning each (control characters, which a header cannot hold,
// become spaces).
func setWarnings(h http.Header, ws []string) {
	for _, warn := range ws {
		h.Add(HeaderWarning, strings.Map(func(r rune) rune {
			if r < ' ' || r == 0x7f {
				return ' '
			}
			return r
		}, warn))
	}
}

// getOffsets serves the offsets in a format other tools read:
// json (ours), libvmi (a LibVMI config entry) or isf (Volatility 3).
func (s *Server) getOffsets(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	k, off, _, err := sess.Kernel(ctx)
	if err != nil {
		return err
	}
	b, ctype, err := FormatOffsets(k, off, r.URL.Query().Get("format"), r.URL.Query().Get("name"))
	if err != nil {
		return badRequest{err}
	}
	w.Header().Set("Content-Type", ctype)
	w.Write(b)
	return nil
}

// FormatOffsets renders offsets as json, libvmi or isf.
func FormatOffsets(k *introspect.Kernel, off *introspect.Offsets, format, name string) ([]byte, string, error) {
	switch format {
	case "", "json":
		b, err := off.JSON(k)
		return b, "application/json", err
	case "libvmi":
		if name == "" {
			name = "guest"
		}
		return []byte(off.LibVMI(k, name)), "text/plain", nil
	case "isf":
		b, err := off.ISF(k)
		return b, "application/json", err
	}
	return nil, "", errors.New("bad format: want json, libvmi or isf")
}

// dumpStall bounds how long one write of a paused dump may wait for the
// client: a client that stops reading must not keep the guest stopped.
// QEMU's own dump-guest-memory pauses the guest for the whole dump too,
// but writes to a file.
const dumpStall = 30 * time.Second

// stallBound fails a write that the client has not taken within dumpStall.
type stallBound struct {
	w  io.Writer
	rc *http.ResponseController
}

func (s stallBound) Write(p []byte) (int, error) {
	s.rc.SetWriteDeadline(time.Now().Add(dumpStall))
	return s.w.Write(p)
}

// getDump streams the guest as an ELF core (guestmem.WriteCore). Unless
// pause=0, the VM is paused for the dump, as QEMU's dump-guest-memory
// does, so the kernel's lists in the dump are consistent; the registers
// are sampled (fresh) just before the pause. The VM is resumed whatever
// happens to the client.
func (s *Server) getDump(w http.ResponseWriter, r *http.Request) {
	src, ok := s.memory(w)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	cpus, err := src.CPUs(ctx)
	cancel()
	if err != nil {
		httpError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	// The memory map too is asked for before the pause: a paused QEMU
	// does not answer QMP, which the TCG source asks for its map.
	if len(src.Regions()) == 0 {
		httpError(w, http.StatusServiceUnavailable, "the guest has no RAM regions yet")
		return
	}
	if r.URL.Query().Get("pause") != "0" {
		resume, err := s.Session.Pause(r.Context())
		if errors.Is(err, session.ErrNoPause) {
			httpError(w, http.StatusNotImplemented, "this VM cannot be paused; ask for pause=0")
			return
		}
		if err != nil {
			httpError(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		defer resume()
	}
	size, err := guestmem.CoreSize(src, cpus)
	if err != nil {
		httpError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/x-elf-core")
	w.Header().Set("Content-Length", strconv.FormatUint(size, 10))
	out := io.Writer(w)
	if r.URL.Query().Get("pause") != "0" {
		out = stallBound{w: w, rc: http.NewResponseController(w)}
	}
	if err := guestmem.WriteCore(out, src, cpus, nil); err != nil {
		// Headers are gone: the short body tells the client.
		s.Log.Warn().Err(err).Msg("dump")
	}
}
