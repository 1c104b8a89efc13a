package api

import (
	"context"
	"errors"
	"net/http"

	"github.com/kvmscope/kvmscope/session"
)

// RuleInfo is one rule of the rule base in force (GET /v1/rules).
type RuleInfo struct {
	Name     string `json:"name"`
	Severity string `json:"severity"`
	Matcher  string `json:"matcher"`
	Line     int    `json:"line"`
}

// RulesInfo is the rule base in force.
type RulesInfo struct {
	Source string     `json:"source"`
	Rules  []RuleInfo `json:"rules"`
}

// errNoRuleFile answers a reload on a VM that has no rule file.
var errNoRuleFile = errors.New("this VM has no rule file to reload (kvmscope run --rules FILE)")

func (s *Server) reportRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/report", s.withSession(s.getReport))
	mux.HandleFunc("GET /v1/rules", s.withSession(s.getRules))
	mux.HandleFunc("POST /v1/rules/reload", s.withSession(s.postRulesReload))
}

// getReport judges the guest now by the rule base, or with cached=1
// returns the newest judgement of the scheduled scans.
func (s *Server) getReport(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	if r.URL.Query().Get("cached") == "1" {
		if rep := sess.LastReport(); rep != nil {
			writeJSON(w, rep)
			return nil
		}
	}
	rep, err := sess.Judge(ctx)
	if err != nil {
		return err
	}
	writeJSON(w, rep)
	return nil
}

func (s *Server) getRules(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	set := sess.Rules()
	out := RulesInfo{Source: set.Source, Rules: []RuleInfo{}}
	for i := range set.Rules {
		rl := &set.Rules[i]
		out.Rules = append(out.Rules, RuleInfo{Name: rl.Name, Severity: rl.Severity.String(), Matcher: rl.Matcher(), Line: rl.Line})
	}
	writeJSON(w, out)
	return nil
}

// postRulesReload reads the rule file again; a file that does not parse
// keeps the rules in force and answers 400 with the error (its line).
func (s *Server) postRulesReload(ctx context.Context, sess *session.Session, w http.ResponseWriter, r *http.Request) error {
	if s.ReloadRules == nil {
		return badRequest{errNoRuleFile}
	}
	if err := s.ReloadRules(); err != nil {
		return badRequest{err}
	}
	return s.getRules(ctx, sess, w, r)
}
