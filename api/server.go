package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/session"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// MaxMemoryRead bounds one GET /v1/memory.
const MaxMemoryRead = 64 << 20

// maxBody bounds request bodies (memory writes).
const maxBody = 1 << 20

// Target is the VM a server describes.
type Target interface {
	// Describe returns the VM's identity, vCPUs and memory map.
	Describe() VM
}

// Server serves one VM's API.
type Server struct {
	Target Target
	Log    zerolog.Logger
	// Owner is the uid besides root that may connect (default: our euid).
	Owner int
	// Groups are gids whose members may connect too (primary or
	// supplementary group of the peer). With groups the socket is 0660 and
	// belongs to Groups[0] when we may give it that group.
	Groups []int
	// Session reads the guest: memory, registers and the guest kernel's
	// objects (/v1/kernel, /v1/processes, /v1/modules, /v1/offsets).
	Session *session.Session
	// Events is the VM's event log (GET /v1/events), or nil.
	Events *eventlog.Log
	// Blocked is the VM's blocked-write log (GET /v1/integrity/blocked),
	// or nil.
	Blocked *eventlog.Log
	// GuardAllowed lets clients change what the guard protects (POST
	// /v1/integrity/guard): kvmscope run --guard or --allow-write.
	GuardAllowed bool
	// Detach ends an attached kvmscope (POST /v1/detach), leaving QEMU as
	// it was; nil for a VM launched under kvmscope, which cannot be
	// left untraced.
	Detach func()
	// ReloadRules reads the VM's rule file again (POST /v1/rules/reload);
	// nil when the VM has none.
	ReloadRules func() error
	// BaselinePath is where GET /v1/integrity keeps its baseline ("":
	// none, judged by the kernel's own rules only).
	BaselinePath string

	metrics *Metrics
	started time.Time

	srv       *http.Server
	ln        net.Listener
	ownSocket bool // Listen made it: Close removes it
}

type ctxKey int

const credKey ctxKey = 0

// Listen creates the socket at path (0600, parent dirs 0700 when created)
// and serves until Close, which removes it.
func (s *Server) Listen(path string) error {
	if s.Session == nil {
		return errors.New("api: a Server needs a Session")
	}
	ln, err := ListenSocket(path, s.Groups, s.Log)
	if err != nil {
		return err
	}
	s.ownSocket = true
	return s.Serve(ln)
}

// ListenSocket creates the API socket at path: 0600, or 0660 owned by the
// first of groups (parent dirs 0700 when created). A socket left by a dead
// kvmscope is replaced; one that still answers is refused.
func ListenSocket(path string, groups []int, log zerolog.Logger) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	// umask-independent 0600 (0660 with groups): create under a
	// restrictive umask.
	mode := os.FileMode(0o600)
	if len(groups) > 0 {
		mode = 0o660
	}
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if len(groups) > 0 {
		if err := giveGroup(path, groups); err != nil {
			log.Warn().Err(err).Msg("API socket group")
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// Serve serves on ln, a socket someone else created (ListenSocket), until
// Close, which leaves the socket file to its creator: the tracer's process
// keeps the API socket of a VM under run, so clients of a restarting
// analysis process wait in its backlog instead of failing.
func (s *Server) Serve(ln net.Listener) error {
	if s.Session == nil {
		return errors.New("api: a Server needs a Session")
	}
	s.ln = ln
	s.started = time.Now()
	if s.Owner == 0 {
		s.Owner = os.Geteuid()
	}
	s.metrics = newMetrics(s.Session.Metrics())
	s.metrics.Registry.MustRegister(newVMCollector(s.Target))
	if s.Events != nil {
		s.metrics.Registry.MustRegister(eventsCollector{s.Events})
	}
	s.metrics.Registry.MustRegister(guardCollector{s.Session})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("GET /v1/health", s.getHealth)
	mux.HandleFunc("GET /v1/vm", s.getVM)
	mux.HandleFunc("GET /v1/vcpus", s.getVCPUs)
	mux.HandleFunc("GET /v1/memory", s.getMemory)
	mux.HandleFunc("GET /v1/events", s.getEvents)
	s.introspectRoutes(mux)
	s.guardRoutes(mux)
	s.reportRoutes(mux)
	s.actionRoutes(mux)
	mux.HandleFunc("POST /v1/detach", s.postDetach)
	mux.HandleFunc("PUT /v1/memory", s.putMemory)
	mux.HandleFunc("PUT /v1/registers", s.putRegisters)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		httpError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint %s %s (see docs/api.md)", r.Method, r.URL.Path))
	})
	s.srv = &http.Server{
		Handler:           s.metrics.instrument(s.authorize(mux)),
		ReadHeaderTimeout: 5 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, credKey, peerCred(c))
		},
	}
	go s.srv.Serve(ln)
	return nil
}

// Close stops serving and removes the socket Listen made.
func (s *Server) Close() error {
	if s.srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if s.ownSocket {
		os.Remove(s.ln.Addr().String())
	}
	return err
}

// removeStaleSocket removes a socket file left by a dead kvmscope, and
// refuses to take over one that still answers.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket; not replacing it", path)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("another kvmscope is serving %s", path)
	}
	return os.Remove(path)
}

func peerCred(c net.Conn) *unix.Ucred {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) {
		cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	return cred
}

// authorize lets root, the owner and members of Groups in.
func (s *Server) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cred, _ := r.Context().Value(credKey).(*unix.Ucred)
		if cred == nil || (cred.Uid != 0 && int(cred.Uid) != s.Owner && !peerInGroups(cred, s.Groups)) {
			uid := -1
			if cred != nil {
				uid = int(cred.Uid)
			}
			s.Log.Warn().Int("uid", uid).Msg("refused API connection from another user")
			httpError(w, http.StatusForbidden, fmt.Sprintf("uid %d may not use this socket", uid))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// getHealth answers as soon as the process serves HTTP at all: it reads
// neither the guest nor QEMU, so that only a process that cannot answer
// (stopped, stuck in the kernel, starved) fails it. The tracer's watchdog
// (docs/how-it-works.md) restarts an analysis process that does.
func (s *Server) getHealth(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, Health{OK: true, Pid: os.Getpid(), UpNs: time.Since(s.started).Nanoseconds()})
}

func (s *Server) getVM(w http.ResponseWriter, r *http.Request) {
	vm := s.Target.Describe()
	if c, err := s.Session.Capabilities(); err == nil {
		out := &Capabilities{Batch: c.Batch, Write: c.Write}
		for _, rg := range c.InPlace {
			out.InPlace = append(out.InPlace, RegionOut{GPA: Hex64(rg.GPA), Size: Hex64(rg.Size), ReadOnly: rg.ReadOnly, Name: rg.Name})
		}
		vm.Source = out
	}
	writeJSON(w, vm)
}

// memory is the guest's current memory source, or a 503 reply.
func (s *Server) memory(w http.ResponseWriter) (guestmem.Source, bool) {
	src, err := s.Session.Memory()
	if err != nil {
		httpError(w, http.StatusServiceUnavailable, err.Error())
		return nil, false
	}
	return src, true
}

func (s *Server) getVCPUs(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	src, ok := s.memory(w)
	if !ok {
		return
	}
	cpus, err := src.CPUs(ctx)
	if err != nil {
		httpError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	out := make([]VCPU, 0, len(cpus))
	for _, c := range cpus {
		out = append(out, VCPUFrom(c))
	}
	writeJSON(w, out)
}

// memoryRange parses ?gpa=ADDR&len=N (or va=ADDR: virtual is set).
func memoryRange(r *http.Request, needLen bool) (gpa uint64, n int, err error) {
	q := r.URL.Query()
	key := "gpa"
	if q.Has("va") {
		key = "va"
	}
	gpa, err = strconv.ParseUint(q.Get(key), 0, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("bad or missing %s %q: want a number such as 0x1000", key, q.Get(key))
	}
	if !needLen {
		return gpa, 0, nil
	}
	l, err := strconv.ParseUint(q.Get("len"), 0, 64)
	if err != nil || l == 0 {
		return 0, 0, fmt.Errorf("bad or missing len %q: want a positive number", q.Get("len"))
	}
	if l > MaxMemoryRead {
		return 0, 0, fmt.Errorf("len %d is over the limit of %d bytes per request", l, MaxMemoryRead)
	}
	if gpa+l < gpa {
		return 0, 0, fmt.Errorf("range %s %#x len %#x wraps around", key, gpa, l)
	}
	return gpa, int(l), nil
}

func (s *Server) getMemory(w http.ResponseWriter, r *http.Request) {
	gpa, n, err := memoryRange(r, true)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	if r.URL.Query().Has("va") {
		// A kernel virtual address, through the guest kernel's page
		// tables.
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		buf, err := s.Session.ReadKernelMemory(ctx, gpa, n)
		if err != nil {
			httpError(w, http.StatusNotFound, err.Error())
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(buf)
		return
	}
	src, ok := s.memory(w)
	if !ok {
		return
	}
	buf := make([]byte, n)
	if _, err := src.ReadAt(buf, int64(gpa)); err != nil {
		status := http.StatusInternalServerError
		var hole *guestmem.HoleError
		if errors.As(err, &hole) {
			status = http.StatusNotFound
		}
		httpError(w, status, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(n))
	w.Write(buf)
}

func (s *Server) putMemory(w http.ResponseWriter, r *http.Request) {
	gpa, _, err := memoryRange(r, false)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	if _, ok := s.memory(w); !ok {
		return
	}
	body, err := readBody(w, r)
	if err != nil {
		httpError(w, http.StatusRequestEntityTooLarge, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	// Paused, all or nothing, read back, and an event with the old and
	// new bytes (session.WriteMemory).
	write := s.Session.WriteMemory
	if r.URL.Query().Has("va") {
		write = s.Session.WriteKernelMemory
	}
	mw, err := write(ctx, gpa, body, "api")
	if err != nil {
		status := http.StatusBadRequest
		switch {
		case errors.Is(err, guestmem.ErrReadOnly):
			status = http.StatusForbidden
		case errors.Is(err, session.ErrWriteDuringAction):
			status = http.StatusConflict
		}
		httpError(w, status, err.Error())
		return
	}
	s.Log.Info().Uint64("gpa", gpa).Int("len", len(body)).Msg("guest memory written through the API")
	writeJSON(w, map[string]any{"written": len(body), "old": mw.Old})
}

func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		return nil, fmt.Errorf("request body: %v (limit %d bytes)", err, maxBody)
	}
	return b, nil
}

// writeJSON writes v as compact JSON (indenting a 5,000-process list
// costs more than the scan; `kvmscope ... --json` and jq print it nicely).
func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func httpError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(Error{Error: msg})
}

// postDetach ends an attached kvmscope: the reply comes first, then the
// API closes.
func (s *Server) postDetach(w http.ResponseWriter, r *http.Request) {
	if s.Detach == nil {
		httpError(w, http.StatusBadRequest, "this VM runs under kvmscope run: it cannot be detached (stopping kvmscope stops the VM, the fail-closed choice; docs/attach.md)")
		return
	}
	writeJSON(w, map[string]bool{"detached": true})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	s.Detach()
}
