package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/prometheus/client_golang/prometheus"
)

// GuardRequest is the body of POST /v1/integrity/guard: protect the
// guest kernel's dispatch, or the ranges given (guest-physical, whole
// pages), or nothing (Off).
type GuardRequest struct {
	Dispatch bool         `json:"dispatch,omitempty"`
	Ranges   []GuardRange `json:"ranges,omitempty"`
	Off      bool         `json:"off,omitempty"`
}

// GuardRange is a guest-physical range to protect.
type GuardRange struct {
	GPA  Hex64 `json:"gpa"`
	Size Hex64 `json:"size"`
}

// errGuardNotAllowed answers a change of the guard on a VM started
// without --guard or --allow-write.
var errGuardNotAllowed = errors.New("changing the guard needs a VM started with --guard or --allow-write")

func (s *Server) guardRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/integrity/guard", s.withSession(s.getGuard))
	mux.HandleFunc("POST /v1/integrity/guard", s.withSession(s.postGuard))
	mux.HandleFunc("GET /v1/integrity/blocked", func(w http.ResponseWriter, r *http.Request) {
		serveLog(w, r, s.Blocked, "blocked-write log")
	})
}

func (s *Server) getGuard(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	g, err := sess.GuardStatus()
	if err != nil {
		return err
	}
	writeJSON(w, g)
	return nil
}

func (s *Server) postGuard(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	if !s.GuardAllowed {
		return forbidden{errGuardNotAllowed}
	}
	var req GuardRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return badRequest{fmt.Errorf("guard request: %w", err)}
	}
	n := 0
	for _, b := range []bool{req.Dispatch, len(req.Ranges) > 0, req.Off} {
		if b {
			n++
		}
	}
	if n != 1 {
		return badRequest{errors.New(`guard request: want exactly one of "dispatch": true, "ranges": [...], "off": true`)}
	}
	var g *session.Guard
	var err error
	if req.Dispatch {
		g, err = sess.GuardDispatch(ctx)
	} else {
		rs := make([]tracer.GuardRange, len(req.Ranges))
		for i, x := range req.Ranges {
			rs[i] = tracer.GuardRange{GPA: uint64(x.GPA), Size: uint64(x.Size)}
		}
		g, err = sess.Guard(ctx, rs)
	}
	if err != nil {
		return err
	}
	s.Log.Warn().Int("protected", len(g.Protected)).Msg("guard changed")
	writeJSON(w, g)
	return nil
}

// forbidden marks a request the VM's options do not allow.
type forbidden struct{ error }

// guardCollector exports the guard's counters.
type guardCollector struct{ sess *session.Session }

var (
	guardBlockedDesc   = prometheus.NewDesc("kvmscope_guard_blocked_writes_total", "Guest stores into guarded pages that the guard blocked.", nil, nil)
	guardProtectedDesc = prometheus.NewDesc("kvmscope_guard_protected_bytes", "Guest-physical bytes the guard holds read-only for the guest now.", nil, nil)
)

func (c guardCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- guardBlockedDesc
	ch <- guardProtectedDesc
}

func (c guardCollector) Collect(ch chan<- prometheus.Metric) {
	g, err := c.sess.GuardStatus()
	if err != nil {
		return // no guard on this VM (TCG): no series
	}
	var bytes uint64
	for _, r := range g.Protected {
		bytes += r.Size
	}
	ch <- prometheus.MustNewConstMetric(guardBlockedDesc, prometheus.CounterValue, float64(g.Blocked))
	ch <- prometheus.MustNewConstMetric(guardProtectedDesc, prometheus.GaugeValue, float64(bytes))
}
