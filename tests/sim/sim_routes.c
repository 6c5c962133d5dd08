/* Every wire format's route table; a new format adds its file and one line here. Searched in
 * order: the first route whose path and method match answers. */
#include "sim.h"

const pq_sim_route_t *const pq_sim_route_tables[] = {
    pq_sim_openai_routes, pq_sim_azure_routes,   pq_sim_anthropic_routes,
    pq_sim_gemini_routes, pq_sim_watsonx_routes, NULL,
};
