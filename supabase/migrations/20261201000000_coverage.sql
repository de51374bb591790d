-- Coverage: which site-days each source still owes, so that the nightly run heals its own holes
-- and a dashboard reads the same truth as the job.

-- Matomo answers a day its archiver has not processed like a day without visits: a 0 is final
-- only once Matomo's raw log shows the day had no visit (or the day has long settled).
-- matomo_final: true (final), false (provisional: a later run fetches it again), NULL (no
-- Matomo value stored).
alter table public.daily_analytics add column if not exists matomo_final boolean;

-- A positive count is final; a 0 stored before this column existed is asked again.
update public.daily_analytics set matomo_final = (matomo_visits > 0)
    where matomo_visits is not null and matomo_final is null;

-- A final count is never replaced by a provisional one, whatever a run sends.
create or replace function public.daily_analytics_keep_final_matomo() returns trigger
language plpgsql as $$
begin
    if old.matomo_final and new.matomo_final is not true then
        new.matomo_visits := old.matomo_visits;
        new.matomo_final := old.matomo_final;
    end if;
    return new;
end;
$$;

drop trigger if exists daily_analytics_keep_final_matomo on public.daily_analytics;
create trigger daily_analytics_keep_final_matomo
    before update on public.daily_analytics
    for each row execute function public.daily_analytics_keep_final_matomo();

-- What the job learnt about each site's sources: the first day a source can have (the site's
-- creation in Matomo), how far back its history is wanted, and why the last run could not ask
-- it (a person must act), if it could not. Written by the job (service role); RLS on, no policy.
create table if not exists public.site_sources (
    site_id bigint not null references public.sites (id) on delete cascade,
    source text not null check (source in ('matomo', 'gsc')),
    -- the Matomo id or account the row was learnt for: another one is learnt afresh
    source_key text not null,
    available_from date,
    -- a site new to the source gets its history back to here; NULL: the heal window only
    history_from date,
    unavailable text,
    checked_at timestamptz not null default now(),
    primary key (site_id, source)
);
alter table public.site_sources enable row level security;

-- What the job reads of site_sources before each run, in one answer whatever the fleet's size
-- (PostgREST pages a table's rows at max-rows, one round trip each).
create or replace function public.site_sources_known()
returns jsonb
language sql stable
set search_path = public
as $$
    select coalesce(jsonb_agg(jsonb_build_array(site_id, source, source_key, available_from, unavailable)),
                    '[]'::jsonb)
    from site_sources
$$;

-- History is for a site that has no value of the source yet (a new site, or a source newly set
-- on it): a site with values gets its holes healed within the heal window, not years of them.
create or replace function public.site_sources_history() returns trigger
language plpgsql
set search_path = public
as $$
begin
    if tg_op = 'UPDATE' and new.source_key = old.source_key then
        new.history_from := old.history_from;
    elsif exists (
        select 1 from daily_analytics a
        where a.site_id = new.site_id
          and case new.source when 'matomo' then a.matomo_visits is not null else a.gsc_clicks is not null end
    ) then
        new.history_from := null;
    end if;
    return new;
end;
$$;

drop trigger if exists site_sources_history on public.site_sources;
create trigger site_sources_history
    before insert or update on public.site_sources
    for each row execute function public.site_sources_history();

-- The days a deployed site wants from a source, to p_to: from the heal window's first day
-- (p_window_from), or for a site new to the source from its history's; never before the first
-- day the source can have (its creation in Matomo; Search Console's oldest kept day, p_gsc_from)
-- nor before p_history_from (HISTORY_DAYS).
create or replace function public.analytics_wanted(
    p_window_from date, p_to date, p_gsc_from date, p_history_from date, p_site bigint default null,
    p_deployed text default 'deployed'
)
returns table (site_id bigint, source text, first_day date, last_day date, unavailable text)
language sql stable
set search_path = public
as $$
    select s.id, k.source,
           greatest(least(p_window_from, ss.history_from), ss.available_from, p_history_from,
                    case when k.source = 'gsc' then p_gsc_from end, date '2005-01-01'),
           p_to,
           ss.unavailable
    from sites s
    cross join lateral (values ('matomo', s.matomo_site_id is not null),
                               ('gsc', s.gsc_account_id is not null)) as k (source, asked)
    left join site_sources ss on ss.site_id = s.id and ss.source = k.source
    where s.status_deployment = p_deployed and k.asked and (p_site is null or s.id = p_site)
      -- a Matomo site whose creation day is not known yet is not asked for older days
      and (k.source = 'gsc' or ss.available_from is not null)
$$;

-- The holes: for each deployed site and source, the runs of wanted days without a final value
-- (never fetched, failed, or provisional), oldest first. One JSON value (PostgREST caps the rows
-- of a set, not a value): [{"site_id", "source", "from", "to"}, ...]. Computed from the final
-- days stored, so its cost grows with the rows, not with the days of history.
create or replace function public.analytics_holes(
    p_window_from date, p_to date, p_gsc_from date, p_history_from date, p_site bigint default null,
    p_deployed text default 'deployed'
)
returns jsonb
language sql stable
set search_path = public
as $$
    with wanted as (
        select * from analytics_wanted(p_window_from, p_to, p_gsc_from, p_history_from, p_site, p_deployed)
        where first_day <= last_day
    ),
    finals as (
        select w.site_id, w.source, a.date,
               lag(a.date) over (partition by w.site_id, w.source order by a.date) as previous
        from wanted w
        join daily_analytics a on a.site_id = w.site_id and a.date between w.first_day and w.last_day
        where case w.source when 'matomo' then a.matomo_final else a.gsc_final end
    ),
    holes as (
        select f.site_id, f.source, coalesce(f.previous + 1, w.first_day) as first_day, f.date - 1 as last_day
        from finals f join wanted w using (site_id, source)
        where f.date - 1 >= coalesce(f.previous + 1, w.first_day)
        union all
        select w.site_id, w.source, coalesce(l.newest + 1, w.first_day), w.last_day
        from wanted w
        left join (select site_id, source, max(date) as newest from finals group by 1, 2) l
            using (site_id, source)
        where coalesce(l.newest + 1, w.first_day) <= w.last_day
    )
    select coalesce(jsonb_agg(jsonb_build_object('site_id', site_id, 'source', source,
                                                 'from', first_day, 'to', last_day)
                              order by first_day, site_id, source), '[]'::jsonb)
    from holes
$$;

-- The fleet at a glance (aggregator.py status, or a dashboard): per source, the wanted site-days
-- of the heal window and of all time: stored (final), provisional, missing, not available (the
-- source cannot be asked for the site until a person acts, or the day is before its first).
create or replace function public.analytics_coverage(
    p_window_from date, p_to date, p_gsc_from date, p_history_from date, p_site bigint default null,
    p_deployed text default 'deployed'
)
returns jsonb
language sql stable
set search_path = public
as $$
    with per_site as (
        select w.source, w.site_id, w.unavailable is not null as unavailable,
               greatest(w.last_day - w.first_day + 1, 0) as wanted,
               greatest(w.last_day - greatest(w.first_day, p_window_from) + 1, 0) as window_wanted,
               greatest(least(w.first_day, w.last_day + 1) - p_window_from, 0) as window_before,
               count(a.date) filter (where f.final) as stored,
               count(a.date) filter (where not f.final) as provisional,
               count(a.date) filter (where f.final and a.date >= p_window_from) as window_stored,
               count(a.date) filter (where not f.final and a.date >= p_window_from) as window_provisional
        from analytics_wanted(p_window_from, p_to, p_gsc_from, p_history_from, p_site, p_deployed) w
        left join daily_analytics a on a.site_id = w.site_id and a.date between w.first_day and w.last_day
        cross join lateral (
            select case w.source when 'matomo' then a.matomo_final else a.gsc_final end as final
        ) f
        group by 1, 2, 3, 4, 5, 6
    ),
    counted as (
        select source, count(*) as sites,
               sum(window_stored) as window_stored, sum(window_provisional) as window_provisional,
               sum(window_wanted - window_stored - window_provisional) filter (where not unavailable) as window_missing,
               sum(window_before) + coalesce(sum(window_wanted - window_stored - window_provisional)
                   filter (where unavailable), 0) as window_not_available,
               sum(stored) as stored, sum(provisional) as provisional,
               sum(wanted - stored - provisional) filter (where not unavailable) as missing,
               sum(wanted - stored - provisional) filter (where unavailable) as not_available
        from per_site group by source
    )
    select coalesce(jsonb_object_agg(source, jsonb_build_object(
        'sites', sites,
        'window', jsonb_build_object('stored', window_stored, 'provisional', window_provisional,
                                     'missing', coalesce(window_missing, 0),
                                     'not_available', coalesce(window_not_available, 0)),
        'overall', jsonb_build_object('stored', stored, 'provisional', provisional,
                                      'missing', coalesce(missing, 0),
                                      'not_available', coalesce(not_available, 0)))), '{}'::jsonb)
    from counted
$$;

-- The sites that need a person, besides a source that cannot be asked (site_sources.unavailable):
-- tracking probably gone (Search Console clicks but no Matomo visit on the 3 newest days both are
-- final), and a traffic cliff (a full week's final visits or clicks at most a fifth of the week
-- before, which had at least 50).
create or replace function public.analytics_attention(p_to date, p_deployed text default 'deployed')
returns jsonb
language sql stable
set search_path = public
as $$
    with deployed as (
        select id, domain, matomo_site_id, gsc_account_id from sites where status_deployment = p_deployed
    ),
    unavailable as (
        select d.id as site_id, d.domain, ss.source, 'unavailable' as kind, ss.unavailable as detail
        from deployed d join site_sources ss on ss.site_id = d.id
        where ss.unavailable is not null
          and case ss.source when 'matomo' then d.matomo_site_id is not null else d.gsc_account_id is not null end
    ),
    recent as (
        select a.site_id, a.matomo_visits, a.gsc_clicks,
               row_number() over (partition by a.site_id order by a.date desc) as n
        from daily_analytics a
        where a.date between p_to - 13 and p_to and a.matomo_final and a.gsc_final
    ),
    tracking as (
        select r.site_id, d.domain, 'matomo' as source, 'tracking' as kind,
               format('%s Search Console clicks and no Matomo visit on the 3 newest final days',
                      sum(r.gsc_clicks)) as detail
        from recent r join deployed d on d.id = r.site_id and d.matomo_site_id is not null
        where r.n <= 3
        group by r.site_id, d.domain
        having count(*) = 3 and bool_and(r.matomo_visits = 0 and r.gsc_clicks > 0)
    ),
    weeks as (
        select a.site_id,
               sum(a.matomo_visits) filter (where a.date > p_to - 7 and a.matomo_final) as visits_now,
               sum(a.matomo_visits) filter (where a.date <= p_to - 7 and a.matomo_final) as visits_before,
               count(*) filter (where a.date > p_to - 7 and a.matomo_final) as visit_days_now,
               count(*) filter (where a.date <= p_to - 7 and a.matomo_final) as visit_days_before,
               sum(a.gsc_clicks) filter (where a.date > p_to - 7 and a.gsc_final) as clicks_now,
               sum(a.gsc_clicks) filter (where a.date <= p_to - 7 and a.gsc_final) as clicks_before,
               count(*) filter (where a.date > p_to - 7 and a.gsc_final) as click_days_now,
               count(*) filter (where a.date <= p_to - 7 and a.gsc_final) as click_days_before
        from daily_analytics a
        where a.date between p_to - 13 and p_to
        group by a.site_id
    ),
    cliffs as (
        select w.site_id, d.domain, m.source, 'cliff' as kind,
               format('%s down from %s to %s week over week', m.what, m.before, m.now) as detail
        from weeks w join deployed d on d.id = w.site_id
        cross join lateral (values
            ('matomo', 'visits', w.visits_before, w.visits_now, w.visit_days_before, w.visit_days_now),
            ('gsc', 'clicks', w.clicks_before, w.clicks_now, w.click_days_before, w.click_days_now)
        ) as m (source, what, before, now, days_before, days_now)
        where m.days_before = 7 and m.days_now = 7 and m.before >= 50 and m.now * 5 <= m.before
    )
    select coalesce(jsonb_agg(to_jsonb(x) order by x.site_id, x.source, x.kind), '[]'::jsonb)
    from (select * from unavailable union all select * from tracking union all select * from cliffs) x
$$;
