package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/prometheus/client_golang/prometheus"
)

// Events is the reply of GET /v1/events.
type Events struct {
	// Events are the events after since, oldest first, each as the event
	// log holds it: {"seq":N,"time":...,"kind":...,...}.
	Events []json.RawMessage `json:"events"`
	// Next is the since of the next request: the last event's seq, or
	// since itself when there was none.
	Next uint64 `json:"next"`
	// Oldest is the oldest seq the log still holds; Lost is set when
	// events after since were rotated away before this request.
	Oldest uint64 `json:"oldest"`
	Lost   bool   `json:"lost,omitempty"`
}

// maxEventsWait bounds a long poll (below the client's 60 s timeout).
const maxEventsWait = 50 * time.Second

// getEvents serves GET /v1/events?since=N&wait=SECONDS&limit=L: the
// events after seq N; with wait, when there is none yet, it waits up to
// that long for one (long polling).
func (s *Server) getEvents(w http.ResponseWriter, r *http.Request) {
	serveLog(w, r, s.Events, "event log")
}

// serveLog serves entries of log after ?since=N, as GET /v1/events does
// (the blocked-write log has the same form).
func serveLog(w http.ResponseWriter, r *http.Request, log *eventlog.Log, what string) {
	if log == nil {
		httpError(w, http.StatusNotFound, "this VM keeps no "+what)
		return
	}
	q := r.URL.Query()
	var since uint64
	var err error
	if v := q.Get("since"); v != "" {
		if since, err = strconv.ParseUint(v, 10, 64); err != nil {
			httpError(w, http.StatusBadRequest, "since: want an event sequence number")
			return
		}
	}
	limit := 1000
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > 10000 {
			httpError(w, http.StatusBadRequest, "limit: want 1 to 10000")
			return
		}
	}
	var wait time.Duration
	if v := q.Get("wait"); v != "" {
		secs, err := strconv.ParseFloat(v, 64)
		if err != nil || secs < 0 {
			httpError(w, http.StatusBadRequest, "wait: want seconds")
			return
		}
		wait = min(time.Duration(secs*float64(time.Second)), maxEventsWait)
	}
	if wait > 0 {
		ctx, cancel := context.WithTimeout(r.Context(), wait)
		err := log.Wait(ctx, since)
		cancel()
		if err != nil && r.Context().Err() != nil {
			return // the client went away
		}
	}
	evs, oldest, err := log.Since(since, limit)
	if err != nil {
		httpError(w, http.StatusInternalServerError, fmt.Sprintf("read the %s: %v", what, err))
		return
	}
	out := Events{Events: evs, Next: since, Oldest: oldest, Lost: oldest > since+1 && since > 0}
	if out.Events == nil {
		out.Events = []json.RawMessage{}
	}
	if n := len(evs); n > 0 {
		var last struct {
			Seq uint64 `json:"seq"`
		}
		json.Unmarshal(evs[n-1], &last)
		out.Next = last.Seq
	}
	writeJSON(w, out)
}

// eventsCollector exports the event log's counts by kind.
type eventsCollector struct{ log *eventlog.Log }

var eventsDesc = prometheus.NewDesc("kvmscope_events_total", "Events appended to the VM's event log since kvmscope started, by kind (ioctl, abi, ...).", []string{"kind"}, nil)

func (c eventsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- eventsDesc }

func (c eventsCollector) Collect(ch chan<- prometheus.Metric) {
	for kind, n := range c.log.Counts() {
		ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(n), kind)
	}
}
