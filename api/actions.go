package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/kvmscope/kvmscope/session"
)

// KillRequest is the body of POST /v1/actions/kill.
type KillRequest struct {
	PID int `json:"pid"`
}

// actionTimeout bounds an action: under TCG a guest may take seconds to
// make the system call an action waits for.
const actionTimeout = 90 * time.Second

// ActionTimeout is how long a client waits for an action's reply: the
// action's bound, and the 20 s an injected system call may take past it
// (session.Kill) and the gdbstub's closing, with some to spare.
const ActionTimeout = actionTimeout + 30*time.Second

func (s *Server) actionRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/actions/kill", s.postKill)
	mux.HandleFunc("GET /v1/files", s.getFile)
}

// postKill kills a guest process from inside the guest (session.Kill):
// only with run --allow-write (403 otherwise); a kill the guest kernel
// could not survive, or kvmscope cannot know it would, is 422 with why.
func (s *Server) postKill(w http.ResponseWriter, r *http.Request) {
	var req KillRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		httpError(w, http.StatusBadRequest, fmt.Sprintf(`kill request: %v (want {"pid": N})`, err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), actionTimeout)
	defer cancel()
	a, err := s.Session.Kill(ctx, req.PID)
	if err != nil {
		status := http.StatusUnprocessableEntity
		switch {
		case errors.Is(err, session.ErrActionNotAllowed):
			status = http.StatusForbidden
		case errors.Is(err, context.DeadlineExceeded):
			status = http.StatusGatewayTimeout
		}
		httpError(w, status, err.Error())
		return
	}
	s.Log.Warn().Int("pid", a.PID).Str("comm", a.Comm).Int("by_pid", a.ByPID).Int64("return", a.Return).Msg("guest process killed through the API")
	writeJSON(w, a)
}
